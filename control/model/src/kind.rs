//! The kinds of object admins declare, registered once.
//!
//! Every kind is a module of its own (its type, its manifest parser, its
//! conversions to and from the API's message) plus one line in `kinds!`
//! below, which makes it an [`ObjectKind`], a variant of [`Object`] (what a
//! manifest or an `Apply` carries) and of the API's `Object` message, and
//! lets generic code (the control service's apply, get, list and delete;
//! `sluicectl`) reach its type through [`ObjectKind::visit`] and
//! [`Object::visit`]. What else a kind is — its store table, the RBAC
//! resource that guards it — is said once, in its [`Kind`] impl: a line of
//! `plain_kind!` for a kind whose apply carries the object itself, a
//! hand-written impl otherwise (Service, whose VIP may be allocated).

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use serde::Serialize;
use sluice_api::v1;

use crate::endpoint::Endpoint;
use crate::grant::{Grant, Resource};
use crate::index::LabelIndex;
use crate::policy::NetworkPolicy;
use crate::service::{Service, ServiceSpec};
use crate::wire::ObjectError;

/// Where objects go when a manifest or a request names no namespace, as in Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Labels and selectors: sorted, so output and comparisons are stable.
pub type Labels = BTreeMap<String, String>;

/// What every object has: a namespace, a name unique in it per kind, labels.
pub trait Meta {
    fn namespace(&self) -> &str;
    fn name(&self) -> &str;
    fn labels(&self) -> &Labels;
}

macro_rules! impl_meta {
    ($($ty:ty),+) => {$(
        impl Meta for $ty {
            fn namespace(&self) -> &str {
                &self.namespace
            }
            fn name(&self) -> &str {
                &self.name
            }
            fn labels(&self) -> &Labels {
                &self.labels
            }
        }
    )+};
}
impl_meta!(Endpoint, Grant, NetworkPolicy);

/// The kinds whose apply carries the object itself (every kind but Service,
/// whose VIP the control service may allocate), each with the API message of
/// its own name.
macro_rules! plain_kind {
    ($($ty:ident: $table:literal, $resource:ident;)+) => {$(
        impl Kind for $ty {
            const KIND: ObjectKind = ObjectKind::$ty;
            const TABLE: &'static str = $table;
            const RESOURCE: Resource = Resource::$resource;
            type Spec = Self;
            type Wire = v1::$ty;

            fn to_spec(&self) -> Self {
                self.clone()
            }

            fn to_wire(&self) -> Self::Wire {
                self.into()
            }

            fn from_wire(wire: Self::Wire) -> Result<Self, ObjectError> {
                wire.try_into()
            }

            fn from_spec<R: Resolve>(spec: Self, _: &mut R) -> Result<Self, R::Error> {
                Ok(spec)
            }

            fn wrap(wire: Self::Wire) -> v1::Object {
                v1::Object {
                    kind: Some(v1::object::Kind::$ty(wire)),
                }
            }
        }
    )+};
}
plain_kind! {
    Endpoint: "endpoint", Endpoints;
    Grant: "grant", Grants;
    NetworkPolicy: "networkpolicy", NetworkPolicies;
}

impl<Vip> Meta for Service<Vip> {
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn labels(&self) -> &Labels {
        &self.labels
    }
}

/// A kind of object, as stored and served by the control service.
pub trait Kind: Meta + TableOf + Clone + PartialEq + fmt::Debug + Send + Sync + 'static {
    const KIND: ObjectKind;
    /// The control service's store table for it.
    const TABLE: &'static str;
    /// What RBAC grants on it.
    const RESOURCE: Resource;
    /// What an apply carries: the object itself, except that a Service may
    /// leave its VIP to the control service.
    type Spec: Meta + Clone + PartialEq + fmt::Debug + Serialize + Send + 'static;
    /// What the API calls it.
    type Wire: prost::Message + Default;

    /// The object as an apply would carry it again.
    fn to_spec(&self) -> Self::Spec;
    fn to_wire(&self) -> Self::Wire;
    /// A stored or served message back into the object (the store holds
    /// only what was validated on the way in; a message that is not valid
    /// now is corrupt, or from a newer version).
    fn from_wire(wire: Self::Wire) -> Result<Self, ObjectError>;
    /// The API's `Object` around the message.
    fn wrap(wire: Self::Wire) -> v1::Object;
    /// What an apply carries, made what is stored: for a Service, with the
    /// VIP `resolve` allocates or checks.
    fn from_spec<R: Resolve>(spec: Self::Spec, resolve: &mut R) -> Result<Self, R::Error>;
}

/// What the control service adds when it admits an applied object.
pub trait Resolve {
    type Error;
    /// The VIP `service` gets: the one it asks for, once checked, or one
    /// allocated for it.
    fn vip(&mut self, service: &ServiceSpec) -> Result<Ipv4Addr, Self::Error>;
}

/// Generic code over every kind: see [`ObjectKind::visit`].
pub trait KindVisitor {
    type Output;
    fn visit<K: Kind>(self) -> Self::Output;
}

/// Generic code over an object of any kind: see [`Object::visit`].
pub trait SpecVisitor {
    type Output;
    fn visit<K: Kind>(self, spec: K::Spec) -> Self::Output;
}

/// Objects of one kind, by (namespace, name). A persistent map: a copy of
/// the state (every change drafts on one) shares all but what it changes,
/// so a change costs what it changes, not the size of the cluster.
pub type Table<K> = imbl::OrdMap<(String, String), Versioned<K>>;

/// Where a kind's table is in [`Objects`] (implemented by `kinds!`).
pub trait TableOf: Sized {
    fn table(objects: &Objects) -> &Table<Self>;
    fn table_mut(objects: &mut Objects) -> &mut Table<Self>;
}

/// Registers the kinds: `Name(field): Type` makes `ObjectKind::Name`,
/// `Object::Name(<Type as Kind>::Spec)`, the table `field` of [`Objects`],
/// and the API's `v1::object::Kind::Name` / `v1::Kind::Name` correspond.
macro_rules! kinds {
    ($($name:ident($field:ident): $ty:ty),+ $(,)?) => {
        /// Every object of every kind, as the control service holds them.
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct Objects {
            $($field: Table<$ty>,)+
            /// Endpoints by label, and services by the labels they select
            /// (see [`crate::index`]); kept by `insert` and `remove`.
            endpoint_labels: LabelIndex,
            service_selectors: LabelIndex,
        }

        impl Objects {
            /// How many objects of `kind` there are.
            pub fn count(&self, kind: ObjectKind) -> usize {
                match kind {
                    $(ObjectKind::$name => self.$field.len()),+
                }
            }
        }

        $(impl TableOf for $ty {
            fn table(objects: &Objects) -> &Table<Self> {
                &objects.$field
            }
            fn table_mut(objects: &mut Objects) -> &mut Table<Self> {
                &mut objects.$field
            }
        })+

        /// The kinds of object a manifest can hold.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        pub enum ObjectKind {
            $($name),+
        }

        impl ObjectKind {
            pub const ALL: &'static [Self] = &[$(Self::$name),+];

            /// The manifest spelling (`kind: Service`); case-sensitive, as in Kubernetes.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$name => stringify!($name)),+
                }
            }

            /// Runs `visitor` with this kind's type.
            pub fn visit<V: KindVisitor>(self, visitor: V) -> V::Output {
                match self {
                    $(Self::$name => visitor.visit::<$ty>()),+
                }
            }
        }

        /// One document of a control-mode manifest, or one object of an API call.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize)]
        #[serde(tag = "kind")]
        pub enum Object {
            $($name(<$ty as Kind>::Spec)),+
        }

        impl Object {
            pub fn kind(&self) -> ObjectKind {
                match self {
                    $(Self::$name(_) => ObjectKind::$name),+
                }
            }

            fn meta(&self) -> &dyn Meta {
                match self {
                    $(Self::$name(spec) => spec),+
                }
            }

            /// Runs `visitor` with the object, typed.
            pub fn visit<V: SpecVisitor>(self, visitor: V) -> V::Output {
                match self {
                    $(Self::$name(spec) => visitor.visit::<$ty>(spec)),+
                }
            }
        }

        impl From<ObjectKind> for v1::Kind {
            fn from(kind: ObjectKind) -> Self {
                match kind {
                    $(ObjectKind::$name => Self::$name),+
                }
            }
        }

        /// `None` for the kinds that are not objects one applies (Node) and for Unspecified.
        pub fn kind_from_proto(kind: v1::Kind) -> Option<ObjectKind> {
            match kind {
                $(v1::Kind::$name => Some(ObjectKind::$name),)+
                _ => None,
            }
        }

        /// The metadata of an API object of any kind.
        pub fn wire_meta(object: &v1::Object) -> Option<&v1::ObjectMeta> {
            match object.kind.as_ref()? {
                $(v1::object::Kind::$name(message) => message.meta.as_ref(),)+
                v1::object::Kind::Node(node) => node.meta.as_ref(),
            }
        }

        fn wire_meta_mut(object: &mut v1::Object) -> Option<&mut v1::ObjectMeta> {
            match object.kind.as_mut()? {
                $(v1::object::Kind::$name(message) => message.meta.as_mut(),)+
                v1::object::Kind::Node(node) => node.meta.as_mut(),
            }
        }

        impl From<&Object> for v1::Object {
            fn from(object: &Object) -> Self {
                let kind = match object {
                    $(Object::$name(spec) => v1::object::Kind::$name(spec.into())),+
                };
                Self { kind: Some(kind) }
            }
        }

        /// Validates as a manifest would (see [`crate::wire`]).
        impl TryFrom<v1::Object> for Object {
            type Error = ObjectError;

            fn try_from(object: v1::Object) -> Result<Self, ObjectError> {
                match object.kind {
                    $(Some(v1::object::Kind::$name(message)) => Ok(Self::$name(message.try_into()?)),)+
                    Some(v1::object::Kind::Node(node)) => Err(ObjectError::NodeNotApplicable {
                        name: node.meta.map(|m| m.name).unwrap_or_default(),
                    }),
                    None => Err(ObjectError::NoKind),
                }
            }
        }
    };
}

kinds! {
    Service(services): Service,
    Endpoint(endpoints): Endpoint,
    Grant(grants): Grant,
    NetworkPolicy(policies): NetworkPolicy,
}

impl Objects {
    pub fn table<K: Kind>(&self) -> &Table<K> {
        K::table(self)
    }

    /// Gives a stored object the version that committed it (what the
    /// indexes hold does not change).
    pub fn set_version<K: Kind>(&mut self, namespace: &str, name: &str, version: u64) {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(stored) = K::table_mut(self).get_mut(&key) {
            stored.version = version;
        }
    }

    pub fn get<K: Kind>(&self, namespace: &str, name: &str) -> Option<&Versioned<K>> {
        self.table::<K>()
            .get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Every object of kind `K`, in (namespace, name) order.
    pub fn all<K: Kind>(&self) -> impl Iterator<Item = &K> {
        self.table::<K>().values().map(|v| &v.object)
    }

    /// Stores `object` at `version`, replacing any of the same name.
    pub fn insert<K: Kind>(&mut self, object: K, version: u64) {
        let key = (object.namespace().to_owned(), object.name().to_owned());
        self.unindex::<K>(&key.0, &key.1);
        self.index(&object);
        K::table_mut(self).insert(key, Versioned { object, version });
    }

    pub fn remove<K: Kind>(&mut self, namespace: &str, name: &str) -> Option<Versioned<K>> {
        self.unindex::<K>(namespace, name);
        K::table_mut(self).remove(&(namespace.to_owned(), name.to_owned()))
    }

    /// The endpoints of `namespace` carrying every label of `selector`.
    pub fn endpoints_selected(
        &self,
        namespace: &str,
        selector: &Labels,
    ) -> impl Iterator<Item = &Endpoint> {
        self.endpoint_labels
            .all_of(namespace, selector)
            .into_iter()
            .filter_map(move |name| self.get::<Endpoint>(namespace, name))
            .map(|e| &e.object)
    }

    /// The services of `namespace` whose selector `labels` satisfy.
    pub fn services_selecting(&self, namespace: &str, labels: &Labels) -> Vec<&Service> {
        let mut names: Vec<&String> = labels
            .iter()
            .filter_map(|(k, v)| self.service_selectors.get(namespace, k, v))
            .flatten()
            .collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter_map(|name| self.get::<Service>(namespace, name))
            .map(|s| &s.object)
            .filter(|s| s.selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .collect()
    }

    fn index<K: Kind>(&mut self, object: &K) {
        let any = object as &dyn std::any::Any;
        if let Some(e) = any.downcast_ref::<Endpoint>() {
            self.endpoint_labels.add(&e.namespace, &e.name, &e.labels);
        } else if let Some(s) = any.downcast_ref::<Service>() {
            self.service_selectors
                .add(&s.namespace, &s.name, &s.selector);
        }
    }

    fn unindex<K: Kind>(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        let Some(old) = K::table(self).get(&key) else {
            return;
        };
        let any = &old.object as &dyn std::any::Any;
        if let Some(e) = any.downcast_ref::<Endpoint>() {
            let labels = e.labels.clone();
            self.endpoint_labels.remove(namespace, name, &labels);
        } else if let Some(s) = any.downcast_ref::<Service>() {
            let selector = s.selector.clone();
            self.service_selectors.remove(namespace, name, &selector);
        }
    }
}

impl ObjectKind {
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|kind| kind.as_str() == name)
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Object {
    pub fn namespace(&self) -> &str {
        self.meta().namespace()
    }

    pub fn name(&self) -> &str {
        self.meta().name()
    }

    pub fn labels(&self) -> &Labels {
        self.meta().labels()
    }

    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef {
            kind: self.kind(),
            namespace: self.namespace().to_owned(),
            name: self.name().to_owned(),
        }
    }
}

/// Names one object; displays as `Service "shop/web"`, as every error message does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn of<K: Kind>(object: &K) -> Self {
        Self {
            kind: K::KIND,
            namespace: object.namespace().to_owned(),
            name: object.name().to_owned(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            kind,
            namespace,
            name,
        } = self;
        // Debug-quoted: an object rejected for its name may hold any characters.
        write!(f, "{kind} {:?}", format!("{namespace}/{name}"))
    }
}

/// An object with the store revision that last changed it (its resource
/// version), as the control service keeps and serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    pub object: T,
    pub version: u64,
}

impl<K: Kind> Versioned<K> {
    /// The API's object, its metadata carrying the resource version.
    pub fn to_wire(&self) -> v1::Object {
        let mut object = K::wrap(self.object.to_wire());
        if let Some(meta) = wire_meta_mut(&mut object) {
            meta.resource_version = self.version;
        }
        object
    }
}

impl Versioned<Object> {
    /// An API object as a served one: the object, validated, and its version.
    pub fn from_wire(object: v1::Object) -> Result<Self, ObjectError> {
        let version = wire_meta(&object).map_or(0, |m| m.resource_version);
        Ok(Self {
            object: Object::try_from(object)?,
            version,
        })
    }
}

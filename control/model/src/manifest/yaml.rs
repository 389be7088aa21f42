//! The YAML side of a manifest: a tree of nodes that remember where they came from,
//! document numbering, and typed access to fields that reports the field path and the
//! position on error.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use super::error::{ManifestError, Position};
use crate::kind::ObjectRef;
use crate::rules::Problem;

// ---------------------------------------------------------------------------------------
// Reading and numbering documents
// ---------------------------------------------------------------------------------------

/// Every non-empty document of `text`, with its 1-based number.
pub(super) fn read_documents(
    source: &str,
    text: &str,
) -> Result<Vec<(usize, Node)>, ManifestError> {
    let starts = document_starts(text);
    // Snippets would repeat the input inside the cause; our message carries the position.
    // A whole cluster (10,000 services with 100,000 endpoints) is one
    // manifest; the default budget (1,024 documents) is meant for config
    // files. Alias and nesting limits stay as they are.
    let options = serde_saphyr::options! {
        with_snippet: false,
        budget: serde_saphyr::budget! {
            max_documents: 1_000_000,
            max_nodes: 50_000_000,
            max_events: 200_000_000,
            max_total_scalar_bytes: 1 << 30,
        },
    };
    let roots =
        serde_saphyr::from_multiple_with_options::<Node>(text, options).map_err(|cause| {
            let location = cause.location().filter(|l| l.line() > 0);
            let document = match location {
                Some(l) => document_at(&starts, l.line()),
                None => starts.len().max(1),
            };
            ManifestError::Yaml {
                at: Box::new(Position {
                    file: source.to_owned(),
                    document,
                    object: None,
                    line: location.map(|l| l.line()),
                    column: location.map(|l| l.column()),
                }),
                cause: Box::new(cause),
            }
        })?;
    Ok(roots
        .into_iter()
        .map(|root| (document_at(&starts, root.line), root))
        .collect())
}

/// The line on which each document starts, ascending. Stops at the first syntax error:
/// serde-saphyr reports that error itself, and the documents before it are all we need
/// to number it.
fn document_starts(text: &str) -> Vec<u64> {
    use serde_saphyr::granit_parser::{Event, Parser};

    let mut starts = Vec::new();
    for event in Parser::new_from_str(text) {
        match event {
            Ok((Event::DocumentStart(..), span)) => {
                // usize is never wider than u64 on the targets we build for.
                starts.push(u64::try_from(span.start.line()).unwrap_or(u64::MAX));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    starts
}

/// 1-based number of the document containing `line`. Documents start on distinct lines
/// (`---` must begin a line), so the line alone decides.
fn document_at(starts: &[u64], line: u64) -> usize {
    starts.partition_point(|&start| start <= line).max(1)
}

// ---------------------------------------------------------------------------------------
// YAML tree
// ---------------------------------------------------------------------------------------

/// A YAML node and where it came from (1-based line and column; for an alias, where the
/// alias is used).
#[derive(Debug)]
pub(super) struct Node {
    pub(super) value: Value,
    pub(super) line: u64,
    pub(super) column: u64,
}

#[derive(Debug)]
pub(super) enum Value {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// In source order; serde-saphyr has already rejected duplicate keys.
    Map(Vec<(Node, Node)>),
}

impl Value {
    /// The value as an error message shows it.
    pub(super) fn describe(&self) -> String {
        match self {
            Self::Null => "null".to_owned(),
            Self::Bool(b) => format!("boolean {b}"),
            Self::Int(i) => format!("integer {i}"),
            Self::Float(x) => format!("number {x}"),
            Self::Str(s) => format!("string {s:?}"),
            Self::Seq(_) => "a sequence".to_owned(),
            Self::Map(_) => "a mapping".to_owned(),
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let Spanned {
            value, referenced, ..
        } = Spanned::<Value>::deserialize(deserializer)?;
        Ok(Self {
            value,
            line: referenced.line(),
            column: referenced.column(),
        })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }

    fn visit_i128<E>(self, v: i128) -> Result<Value, E> {
        Ok(Value::Int(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        i128::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom(format!("integer {v} is too large")))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        Value::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Value::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<Node, Node>()? {
            entries.push(entry);
        }
        Ok(Value::Map(entries))
    }
}

// ---------------------------------------------------------------------------------------
// Typed access
// ---------------------------------------------------------------------------------------

/// What every error raised while validating one document needs to know.
#[derive(Clone, Copy)]
pub(super) struct Cx<'a> {
    pub(super) file: &'a str,
    pub(super) document: usize,
    pub(super) object: Option<&'a ObjectRef>,
}

impl Cx<'_> {
    pub(super) fn at(&self, node: &Node) -> Box<Position> {
        Box::new(Position {
            file: self.file.to_owned(),
            document: self.document,
            object: self.object.cloned(),
            line: Some(node.line),
            column: Some(node.column),
        })
    }

    /// `node`, at `field`, breaks a rule.
    pub(super) fn invalid(&self, node: &Node, field: &str, problem: Problem) -> ManifestError {
        ManifestError::from_problem(self.at(node), field.to_owned(), problem)
    }

    /// For `map_err`: the rule's problem, located at `node`.
    pub(super) fn fail<'c>(
        &'c self,
        node: &'c Node,
        field: &'c str,
    ) -> impl FnOnce(Problem) -> ManifestError + 'c {
        move |problem| self.invalid(node, field, problem)
    }
}

/// A YAML mapping seen as the fields of one object at `path` (`""` for a document).
pub(super) struct Fields<'n> {
    pub(super) path: String,
    pub(super) node: &'n Node,
    entries: &'n [(Node, Node)],
}

impl<'n> Fields<'n> {
    pub(super) fn new(cx: Cx<'_>, path: String, node: &'n Node) -> Result<Self, ManifestError> {
        match &node.value {
            Value::Map(entries) => Ok(Self {
                path,
                node,
                entries,
            }),
            other => Err(ManifestError::WrongType {
                at: cx.at(node),
                field: path,
                expected: "a mapping",
                found: other.describe(),
            }),
        }
    }

    pub(super) fn path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The key node of `key`, even when its value is null.
    pub(super) fn key(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| matches!(&k.value, Value::Str(s) if s == key))
            .map(|(k, _)| k)
    }

    /// The value of `key`; null counts as absent (see the module docs).
    pub(super) fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| matches!(&k.value, Value::Str(s) if s == key))
            .map(|(_, v)| v)
            .filter(|v| !matches!(v.value, Value::Null))
    }

    pub(super) fn require(&self, cx: Cx<'_>, key: &str) -> Result<&'n Node, ManifestError> {
        self.get(key).ok_or_else(|| ManifestError::MissingField {
            at: cx.at(self.node),
            field: self.path(key),
        })
    }

    pub(super) fn deny_unknown(
        &self,
        cx: Cx<'_>,
        allowed: &'static [&'static str],
    ) -> Result<(), ManifestError> {
        for (key, _) in self.entries {
            let name = match &key.value {
                Value::Str(s) if allowed.contains(&s.as_str()) => continue,
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                other => other.describe(),
            };
            return Err(ManifestError::UnknownField {
                at: cx.at(key),
                field: self.path(&name),
                expected: allowed,
            });
        }
        Ok(())
    }
}

pub(super) fn string<'n>(
    cx: Cx<'_>,
    field: &str,
    node: &'n Node,
) -> Result<&'n str, ManifestError> {
    match &node.value {
        Value::Str(s) => Ok(s),
        other => Err(wrong_type(cx, field, node, "a string", other)),
    }
}

pub(super) fn integer(cx: Cx<'_>, field: &str, node: &Node) -> Result<i128, ManifestError> {
    match &node.value {
        Value::Int(i) => Ok(*i),
        other => Err(wrong_type(cx, field, node, "an integer", other)),
    }
}

pub(super) fn boolean(cx: Cx<'_>, field: &str, node: &Node) -> Result<bool, ManifestError> {
    match &node.value {
        Value::Bool(b) => Ok(*b),
        other => Err(wrong_type(cx, field, node, "a boolean", other)),
    }
}

pub(super) fn sequence<'n>(
    cx: Cx<'_>,
    field: &str,
    node: &'n Node,
) -> Result<&'n [Node], ManifestError> {
    match &node.value {
        Value::Seq(items) => Ok(items),
        other => Err(wrong_type(cx, field, node, "a sequence", other)),
    }
}

pub(super) fn mapping<'n>(
    cx: Cx<'_>,
    field: &str,
    node: &'n Node,
) -> Result<&'n [(Node, Node)], ManifestError> {
    match &node.value {
        Value::Map(entries) => Ok(entries),
        other => Err(wrong_type(cx, field, node, "a mapping", other)),
    }
}

pub(super) fn wrong_type(
    cx: Cx<'_>,
    field: &str,
    node: &Node,
    expected: &'static str,
    found: &Value,
) -> ManifestError {
    ManifestError::WrongType {
        at: cx.at(node),
        field: field.to_owned(),
        expected,
        found: found.describe(),
    }
}

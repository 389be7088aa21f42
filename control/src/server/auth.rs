//! Who is calling: the verified client certificate of the TLS connection.
//!
//! The TLS layer already refused certificates that do not chain to the
//! cluster CA or are expired (client authentication is optional there only
//! because `Join` comes without one). Each call checks again, against the CA
//! and the clock, and then against the state: a node must still be a member
//! and present one of its current certificates (removal and renewal retire
//! the others); an admin is authorized per call by RBAC.

use tonic::Request;

use super::Control;
use crate::{error::ApiError, rbac::Caller};
use sluice_pki::Identity;

impl Control {
    fn identity<T>(&self, request: &Request<T>) -> Result<(Identity, String), ApiError> {
        let chain = request
            .peer_certs()
            .ok_or_else(|| ApiError::Unauthenticated {
                reason: "this call needs a client certificate issued by this cluster's CA"
                    .to_string(),
            })?;
        let info = self
            .ca
            .verify_client(&chain)
            .map_err(|e| ApiError::Unauthenticated {
                reason: format!("client certificate refused: {e}"),
            })?;
        Ok((info.identity, info.serial))
    }

    /// The calling node's name; refused unless it is a member presenting one
    /// of its current certificates.
    pub fn authenticate_node<T>(&self, request: &Request<T>) -> Result<String, ApiError> {
        match self.identity(request)? {
            (Identity::Node { name }, serial) => {
                let state = self.state();
                match state.nodes.get(&name) {
                    Some(node) if node.object.serials.contains(&serial) => Ok(name),
                    Some(_) => Err(ApiError::Unauthenticated {
                        reason: format!(
                            "node \"{name}\": certificate {serial} has been replaced; use the current one"
                        ),
                    }),
                    None => Err(ApiError::Unauthenticated {
                        reason: format!(
                            "node \"{name}\" is not a member of this cluster (removed, or never joined)"
                        ),
                    }),
                }
            }
            (Identity::User { name, .. }, _) => Err(ApiError::Unauthenticated {
                reason: format!("user \"{name}\": this call is for nodes"),
            }),
        }
    }

    /// The calling admin; authorization is up to the handler (RBAC).
    pub fn authenticate_user<T>(&self, request: &Request<T>) -> Result<Caller, ApiError> {
        match self.identity(request)? {
            (Identity::User { name, groups }, _) => Ok(Caller { name, groups }),
            (Identity::Node { name }, _) => Err(ApiError::Unauthenticated {
                reason: format!("node \"{name}\": this call is for admins"),
            }),
        }
    }

    /// Any caller (WhoAmI).
    pub fn authenticate_any<T>(&self, request: &Request<T>) -> Result<Identity, ApiError> {
        match self.identity(request)? {
            (Identity::Node { .. }, _) => {
                let name = self.authenticate_node(request)?;
                Ok(Identity::Node { name })
            }
            (user, _) => Ok(user),
        }
    }
}

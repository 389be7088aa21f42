//! Addresses, ports, protocols, algorithms, weights and backend lists.

use super::*;

/// An address that can carry service traffic: a VIP, a backend or an endpoint.
pub fn validate_address(value: &str) -> Result<Ipv4Addr, Problem> {
    let problem = match value.parse::<Ipv4Addr>() {
        Err(_) if value.parse::<Ipv6Addr>().is_ok() => AddressProblem::Ipv6,
        Err(_) => AddressProblem::NotIpv4,
        Ok(addr) if addr.is_unspecified() => AddressProblem::Unspecified,
        Ok(addr) if addr.is_broadcast() => AddressProblem::Broadcast,
        Ok(addr) if addr.is_multicast() => AddressProblem::Multicast,
        Ok(addr) if addr.is_loopback() => AddressProblem::Loopback,
        Ok(addr) => return Ok(addr),
    };
    Err(Problem::InvalidAddress {
        value: value.to_owned(),
        problem,
    })
}

/// A port or target port. Takes `i128` so that every integer a manifest or a message
/// can hold is reported as written rather than truncated.
pub fn validate_port(value: i128) -> Result<u16, Problem> {
    u16::try_from(value)
        .ok()
        .filter(|&port| port != 0)
        .ok_or(Problem::PortOutOfRange { value })
}

pub fn validate_port_count(count: usize) -> Result<(), Problem> {
    if count == 0 {
        return Err(Problem::NoPorts);
    }
    if count > MAX_PORTS_PER_SERVICE {
        return Err(Problem::TooManyPorts {
            count,
            max: MAX_PORTS_PER_SERVICE,
        });
    }
    Ok(())
}

/// Case-sensitive, see [`Protocol`].
pub fn validate_protocol(value: &str) -> Result<Protocol, Problem> {
    value.parse().map_err(|_| Problem::UnknownProtocol {
        value: value.to_owned(),
    })
}

pub fn validate_algorithm(value: &str) -> Result<Algorithm, Problem> {
    value.parse().map_err(|_| Problem::UnknownAlgorithm {
        value: value.to_owned(),
    })
}

pub fn validate_weight(value: i128) -> Result<u32, Problem> {
    u32::try_from(value)
        .ok()
        .filter(|w| (1..=MAX_WEIGHT).contains(w))
        .ok_or(Problem::WeightOutOfRange { value })
}

/// A Maglev table size: a prime between 2 and
/// [`MAGLEV_MAX_TABLE_SIZE`], and only for the `maglev` algorithm.
pub fn validate_maglev_table_size(value: i128, algorithm: Algorithm) -> Result<u32, Problem> {
    if algorithm != Algorithm::Maglev {
        return Err(Problem::MaglevTableSizeWithout { algorithm });
    }
    u32::try_from(value)
        .ok()
        .filter(|&n| n <= MAGLEV_MAX_TABLE_SIZE && maglev::is_prime(n))
        .ok_or(Problem::MaglevTableSize {
            value,
            max: MAGLEV_MAX_TABLE_SIZE,
        })
}

pub fn validate_backend_count(count: usize) -> Result<(), Problem> {
    if count > MAX_BACKENDS_PER_SERVICE {
        return Err(Problem::TooManyBackends {
            count,
            max: MAX_BACKENDS_PER_SERVICE,
        });
    }
    Ok(())
}

/// A backend must not be its own service's VIP: the data plane would rewrite the packet
/// to the address it was already sent to and loop it.
pub fn validate_backend_address(address: Ipv4Addr, vip: Option<Ipv4Addr>) -> Result<(), Problem> {
    if vip == Some(address) {
        return Err(Problem::BackendIsVip { address });
    }
    Ok(())
}

/// A service takes its backends from one place: static `backends`, or the endpoints its
/// `selector` matches. Merging both would make it unclear which list an edit changes.
pub fn validate_backends_or_selector(
    has_backends: bool,
    has_selector: bool,
) -> Result<(), Problem> {
    if has_backends && has_selector {
        return Err(Problem::BackendsAndSelector);
    }
    Ok(())
}

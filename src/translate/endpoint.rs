//! ClusterLoadAssignments: the backends of each service port (EDS), and the
//! single local endpoint of an inbound cluster.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::{
    Address, HealthStatus, SocketAddress, address, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as XdsEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};

use crate::model::Endpoint;

/// A TCP socket address.
pub fn socket_address(ip: IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port.into())),
            ..Default::default()
        })),
    }
}

fn lb_endpoint(ip: IpAddr, port: u16, health: HealthStatus) -> LbEndpoint {
    LbEndpoint {
        health_status: health as i32,
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(XdsEndpoint {
            address: Some(socket_address(ip, port)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// EDS resource for one service port. Unready backends stay listed as
/// UNHEALTHY (rather than dropped) so `/clusters` shows them and Envoy keeps
/// their stats; Envoy does not balance to them.
pub fn assignment(cluster_name: &str, endpoints: &[Endpoint]) -> ClusterLoadAssignment {
    let lb_endpoints = endpoints
        .iter()
        .map(|e| {
            let health = if e.ready {
                HealthStatus::Healthy
            } else {
                HealthStatus::Unhealthy
            };
            lb_endpoint(e.ip, e.port, health)
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: cluster_name.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Inline assignment of a STATIC inbound cluster: the app in the pod.
pub fn static_assignment(cluster_name: &str, ip: IpAddr, port: u16) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: cluster_name.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![lb_endpoint(ip, port, HealthStatus::Unknown)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

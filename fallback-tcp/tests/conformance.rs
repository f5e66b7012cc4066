//! The transport crate's conformance suite, run against TcpTransport on loopback.

mod common;

use common::*;
use transport::Transport;

#[test]
fn transport_conformance_suite() {
    transport::conformance::run_all(|ids| {
        connect(ids.iter().map(|&id| config(id, any())).collect())
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn Transport>)
            .collect()
    });
}

//! Integration tests: pgsplit in front of a real primary and streaming
//! replica started from the installed PostgreSQL binaries, with the primary
//! reached through a fault tunnel. Clients are tokio-postgres, raw protocol
//! bytes, psql and pgbench.
//!
//! Each test starts its own stack (cargo-nextest runs every test in its own
//! process), so tests never share state and can stop servers freely.

mod admin;
mod auth;
mod auth_query;
mod chaos;
mod common;
mod consistency;
mod console;
mod docs;
mod failover;
mod failure;
mod faults;
mod hostile;
mod pipeline;
mod pooling;
mod protocol;
mod reload;
mod resolution;
mod routing;
mod session;
mod soak;
mod timeouts;
mod tls;
mod tools;
mod transparency;

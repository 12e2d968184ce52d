//! Integration tests of `skiffd`: real three-node clusters of separate processes on loopback,
//! and the data service's clients against a real socket (in a real sandbox when root).

mod attack;
mod auth;
mod backup;
mod bounds;
mod cluster;
mod data;
mod functions;
mod harness;
mod idempotency;
mod layers;
mod stages;
mod streams;
mod tls;

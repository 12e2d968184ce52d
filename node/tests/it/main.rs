//! Integration tests of `skiffd`: real three-node clusters of separate processes on loopback.

mod cluster;
mod harness;

//! The adversarial suite, organised by the actor who sends the input: a stranger on the network
//! (no token, or no certificate), an invoker, a deployer, a function at each tier (the escape
//! suite in `sandbox/tests/it/escape.rs` covers the sandbox itself), and a local unprivileged
//! user on a node. docs/security.md maps each test to the asset it protects.

mod deployer;
mod invoker;
mod local_user;
mod stranger;

//! A local unprivileged user on a node: no token, but a shell on the machine.

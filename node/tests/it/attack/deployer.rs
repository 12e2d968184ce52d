//! A deployer: may deploy and remove functions and start streams, never reach the host as the
//! node's user, other deployers' secrets beyond its role, or paths the operator did not open.

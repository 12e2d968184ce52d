//! A stranger on the network: no token, no client certificate, or only the ability to open TCP
//! connections to a node's port.

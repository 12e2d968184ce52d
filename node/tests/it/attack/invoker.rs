//! An invoker: holds a token that may call functions and read results, never deploy.

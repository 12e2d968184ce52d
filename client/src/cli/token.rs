//! `skiff token`: bearer tokens: create (the secret is printed once), list, revoke.

use clap::Subcommand;
use serde_json::json;

use super::render::{out, token_json, tokens_table};
use super::CliError;
use crate::api::{CreatedToken, Role, TokenId};
use crate::client::Client;

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Make a token; prints its secret, which is shown this once and never stored.
    Create {
        /// admin, deployer or invoker (see docs/security.md).
        #[arg(long)]
        role: Role,
        /// A label for `token ls` (1-64 bytes).
        #[arg(long)]
        name: Option<String>,
    },
    /// Every token with its id, name, role, creation time and state; never a secret.
    Ls,
    /// Revoke a token: every node refuses it once it has applied the revocation.
    Revoke { id: TokenId },
}

/// Runs one `skiff token` command.
pub(super) async fn run(client: &Client, cmd: TokenCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        TokenCmd::Create { role, name } => {
            let CreatedToken { token, secret } = client.token_create(role, name).await?;
            if json {
                out(&json!({"token": token_json(&token), "secret": secret}).to_string());
            } else {
                eprintln!(
                    "token {} ({}) created; its secret follows, shown this once:",
                    token.id, token.role
                );
                out(&secret);
            }
        }
        TokenCmd::Ls => {
            let list = client.tokens().await?;
            if json {
                let items: Vec<serde_json::Value> = list.iter().map(token_json).collect();
                out(&serde_json::Value::Array(items).to_string());
            } else {
                out(&tokens_table(&list));
            }
        }
        TokenCmd::Revoke { id } => {
            let token = client.token_revoke(id).await?;
            if json {
                out(&token_json(&token).to_string());
            } else {
                out(&format!("token {} revoked", token.id));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::tests::parse;
    use crate::cli::Cmd;

    #[test]
    fn token_commands_parse() {
        match parse(&["token", "create", "--role", "deployer", "--name", "ci"])
            .expect("parses")
            .command
        {
            Cmd::Token(TokenCmd::Create { role, name }) => {
                assert_eq!((role, name.as_deref()), (Role::Deployer, Some("ci")));
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(parse(&["token", "create", "--role", "root"]).is_err());
        assert!(parse(&["token", "create"]).is_err(), "--role is required");
        assert!(matches!(
            parse(&["token", "revoke", "3"]).expect("parses").command,
            Cmd::Token(TokenCmd::Revoke { id: 3 })
        ));
        assert!(parse(&["token", "revoke", "x"]).is_err());
        let cli = parse(&["--token", "skiff_abc", "token", "ls", "--json"]).expect("parses");
        assert_eq!(cli.token.as_deref(), Some("skiff_abc"));
        assert!(cli.json && matches!(cli.command, Cmd::Token(TokenCmd::Ls)));
    }
}

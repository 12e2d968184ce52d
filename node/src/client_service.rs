//! The client service (`ClientApi`): one [`ClientService`] per client connection.
//!
//! Invariants:
//! - every call first checks the connection's token ([`Session::allow`]); the role each call
//!   needs is the table in docs/security.md (`cluster_init` alone needs none);
//! - every answer passes through `ClientService::counted`, so a refused input is counted
//!   once, on the node that answered;
//! - the calls only route: writes and reads go through the [`Replica`], invocations through
//!   the [`Invoker`], streams through [`crate::streams`], admin calls through
//!   [`crate::admin`].

use std::collections::BTreeMap;

use skiff_client::api::{
    ApiError, BackupChunk, ClientApi, ClientCommand, ClusterStatus, CommandResult, CreatedToken,
    FunctionRecord, InvokeRequest, KvEntry, KvPage, NodeId, ReadConsistency, RequestId, Role,
    StreamId, StreamJob, StreamStartRequest, Task, TaskFilter, TaskId, TokenId, TokenInfo, Workers,
};
use skiff_raft_store::model::Principal;
use tarpc::context::Context;

use crate::admin;
use crate::auth::Session;
use crate::invoke::Invoker;
use crate::peer::{AdminOp, AdminResult, ReadOp, ReadResult, StreamOp, StreamReply};
use crate::replica::Replica;
use crate::streams;

/// The client service of one connection.
#[derive(Clone)]
pub struct ClientService {
    session: Session,
    invoker: Invoker,
}

/// The `rejected_inputs` reason of a refused client call, if it is a refusal of the input (not
/// of the moment: overload, no leader and timeouts are counted elsewhere or not at all).
fn refusal_reason(e: &ApiError) -> Option<&'static str> {
    match e {
        ApiError::InvalidArgument(_) => Some("invalid_argument"),
        ApiError::Unauthenticated(_) => Some("unauthenticated"),
        ApiError::PermissionDenied(_) => Some("permission_denied"),
        _ => None,
    }
}

impl ClientService {
    /// The service of one client connection: its session (the token it presented) and the
    /// node's invocation path.
    pub fn new(session: Session, invoker: Invoker) -> ClientService {
        ClientService { session, invoker }
    }

    fn replica(&self) -> &Replica {
        self.invoker.replica()
    }

    /// Every client call's answer passes here: a refused input is counted once, on the node
    /// that answered, whichever check refused it.
    fn counted<T>(&self, answer: Result<T, ApiError>) -> Result<T, ApiError> {
        if let Err(Some(reason)) = answer.as_ref().map_err(refusal_reason) {
            self.replica().metrics().rejected(reason);
        }
        answer
    }
}

/// Refuses commands only nodes may send (heartbeats, completions) or that have their own call
/// (submissions go through `invoke`).
fn client_commands_only(commands: &[ClientCommand]) -> Result<(), ApiError> {
    if commands.iter().any(|c| !c.command.is_client_command()) {
        return Err(ApiError::InvalidArgument(
            "heartbeats, completions and submissions cannot be sent with write (use invoke)".into(),
        ));
    }
    Ok(())
}

impl ClientApi for ClientService {
    async fn write(
        self,
        _: Context,
        commands: skiff_client::api::Commands,
    ) -> Result<Vec<CommandResult>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                let commands = commands.into_inner();
                let token = self.session.allow_write(&commands).await?;
                client_commands_only(&commands)?;
                self.replica()
                    .write(Principal::Token(token.id), commands)
                    .await
            }
            .await,
        )
    }

    async fn kv_get(
        self,
        _: Context,
        key: String,
        read: ReadConsistency,
    ) -> Result<Option<KvEntry>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.session.allow(Role::Invoker, "reading a key").await?;
                match self.replica().read(ReadOp::Get { key }, read).await? {
                    ReadResult::Get(e) => Ok(e),
                    _ => Err(ApiError::Internal(
                        "a get was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn kv_list(
        self,
        _: Context,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
        read: ReadConsistency,
    ) -> Result<KvPage, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.session.allow(Role::Invoker, "listing keys").await?;
                match self
                    .replica()
                    .read(
                        ReadOp::List {
                            prefix,
                            start_after,
                            limit,
                        },
                        read,
                    )
                    .await?
                {
                    ReadResult::List(p) => Ok(p),
                    _ => Err(ApiError::Internal(
                        "a list was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn cluster_init(
        self,
        _: Context,
        members: BTreeMap<NodeId, String>,
        admin_token: String,
    ) -> Result<TokenInfo, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                // No token needed: on a fresh cluster there is none yet. Once the cluster has
                // tokens the bootstrap inside is refused, so this gives nothing away.
                admin::init(self.replica(), members, &admin_token).await
            }
            .await,
        )
    }

    async fn cluster_add_node(self, _: Context, id: NodeId, addr: String) -> Result<(), ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.session.allow(Role::Admin, "adding a node").await?;
                admin::admin(self.replica(), AdminOp::AddNode { id, addr })
                    .await
                    .map(|_| ())
            }
            .await,
        )
    }

    async fn cluster_remove_node(self, _: Context, id: NodeId) -> Result<(), ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.session.allow(Role::Admin, "removing a node").await?;
                admin::admin(self.replica(), AdminOp::RemoveNode { id })
                    .await
                    .map(|_| ())
            }
            .await,
        )
    }

    async fn cluster_status(self, _: Context) -> Result<ClusterStatus, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.session.allow(Role::Invoker, "cluster status").await?;
                match admin::admin(self.replica(), AdminOp::Status).await? {
                    AdminResult::Status(s) => Ok(s),
                    AdminResult::Done => Err(ApiError::Internal(
                        "status answered without a status".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn invoke(self, _: Context, req: InvokeRequest) -> Result<Task, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                let token = self
                    .session
                    .allow(Role::Invoker, "invoking a function")
                    .await?;
                self.invoker.invoke(Principal::Token(token.id), req).await
            }
            .await,
        )
    }

    async fn task_get(
        self,
        _: Context,
        id: TaskId,
        read: ReadConsistency,
    ) -> Result<Option<Task>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.session.allow(Role::Invoker, "reading a task").await?;
                match self.replica().read(ReadOp::Task { id }, read).await? {
                    ReadResult::Task(t) => Ok(t.map(|t| *t)),
                    _ => Err(ApiError::Internal(
                        "a task read was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn task_list(
        self,
        _: Context,
        filter: TaskFilter,
        after: TaskId,
        limit: u32,
        read: ReadConsistency,
    ) -> Result<Vec<Task>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.session.allow(Role::Invoker, "listing tasks").await?;
                let op = ReadOp::Tasks {
                    filter,
                    after,
                    limit,
                };
                match self.replica().read(op, read).await? {
                    ReadResult::Tasks(t) => Ok(t),
                    _ => Err(ApiError::Internal(
                        "a task list was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn fn_get(
        self,
        _: Context,
        name: String,
        read: ReadConsistency,
    ) -> Result<Option<FunctionRecord>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                let token = self
                    .session
                    .allow(Role::Invoker, "reading a function")
                    .await?;
                match self.replica().read(ReadOp::Function { name }, read).await? {
                    ReadResult::Function(f) => Ok(f.map(|f| crate::auth::function_for(&token, *f))),
                    _ => Err(ApiError::Internal(
                        "a function read was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn fn_list(
        self,
        _: Context,
        read: ReadConsistency,
    ) -> Result<Vec<FunctionRecord>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                let token = self
                    .session
                    .allow(Role::Invoker, "listing functions")
                    .await?;
                match self.replica().read(ReadOp::Functions, read).await? {
                    ReadResult::Functions(f) => Ok(f
                        .into_iter()
                        .map(|f| crate::auth::function_for(&token, f))
                        .collect()),
                    _ => Err(ApiError::Internal(
                        "a function list was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn stream_start(
        self,
        _: Context,
        request_id: RequestId,
        req: StreamStartRequest,
    ) -> Result<StreamId, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                let token = self
                    .session
                    .allow(Role::Deployer, "starting a stream")
                    .await?;
                let op = StreamOp::Start { request_id, req };
                match streams::request(&self.invoker, Principal::Token(token.id), op).await? {
                    StreamReply::Started(id) => Ok(id),
                    other => Err(ApiError::Internal(format!(
                        "a stream start was answered with {other:?}"
                    ))),
                }
            }
            .await,
        )
    }

    async fn stream_get(
        self,
        _: Context,
        id: StreamId,
        read: ReadConsistency,
    ) -> Result<Option<StreamJob>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.session
                    .allow(Role::Invoker, "reading a stream")
                    .await?;
                streams::get(self.replica(), id, read).await
            }
            .await,
        )
    }

    async fn stream_list(
        self,
        _: Context,
        read: ReadConsistency,
    ) -> Result<Vec<StreamJob>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.session.allow(Role::Invoker, "listing streams").await?;
                streams::list(self.replica(), read).await
            }
            .await,
        )
    }

    async fn stream_cancel(
        self,
        _: Context,
        request_id: RequestId,
        id: StreamId,
    ) -> Result<(), ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                let token = self
                    .session
                    .allow(Role::Deployer, "cancelling a stream")
                    .await?;
                let op = StreamOp::Cancel { request_id, id };
                streams::request(&self.invoker, Principal::Token(token.id), op)
                    .await
                    .map(|_| ())
            }
            .await,
        )
    }

    async fn stream_redrive(
        self,
        _: Context,
        request_id: RequestId,
        id: StreamId,
    ) -> Result<u64, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                let token = self
                    .session
                    .allow(Role::Deployer, "redriving a stream")
                    .await?;
                let op = StreamOp::Redrive { request_id, id };
                match streams::request(&self.invoker, Principal::Token(token.id), op).await? {
                    StreamReply::Redriven(n) => Ok(n),
                    other => Err(ApiError::Internal(format!(
                        "a stream redrive was answered with {other:?}"
                    ))),
                }
            }
            .await,
        )
    }

    async fn backup_chunk(
        self,
        _: Context,
        export: Option<u64>,
        offset: u64,
    ) -> Result<BackupChunk, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                // The whole state, token hashes included: admins only.
                self.session.allow(Role::Admin, "a backup").await?;
                let op = ReadOp::Backup { export, offset };
                match self
                    .replica()
                    .read(op, ReadConsistency::Linearizable)
                    .await?
                {
                    ReadResult::Backup(chunk) => Ok(*chunk),
                    _ => Err(ApiError::Internal(
                        "a backup read was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn workers(self, _: Context, read: ReadConsistency) -> Result<Workers, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.session
                    .allow(Role::Invoker, "reading the workers")
                    .await?;
                match self.replica().read(ReadOp::Workers, read).await? {
                    ReadResult::Workers(w) => Ok(w),
                    _ => Err(ApiError::Internal(
                        "a workers read was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn token_create(
        self,
        _: Context,
        role: Role,
        name: Option<String>,
    ) -> Result<CreatedToken, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.session.allow(Role::Admin, "creating a token").await?;
                admin::token_create(self.replica(), role, name).await
            }
            .await,
        )
    }

    async fn token_list(
        self,
        _: Context,
        read: ReadConsistency,
    ) -> Result<Vec<TokenInfo>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.session.allow(Role::Admin, "listing tokens").await?;
                match self.replica().read(ReadOp::Tokens, read).await? {
                    ReadResult::Tokens(t) => Ok(t),
                    _ => Err(ApiError::Internal(
                        "a token list was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn token_revoke(
        self,
        _: Context,
        request_id: RequestId,
        id: TokenId,
    ) -> Result<TokenInfo, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                let token = self.session.allow(Role::Admin, "revoking a token").await?;
                admin::token_revoke(self.replica(), Principal::Token(token.id), request_id, id)
                    .await
            }
            .await,
        )
    }
}

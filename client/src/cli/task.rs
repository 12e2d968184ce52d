//! `skiff task`: invocations (tasks): one task's state, timings, error and output, and
//! bounded listings filtered by function, state or dead letter.

use clap::Subcommand;
use skiff_proto::functions::{validate_function_name, ACTIVE_TASKS_MAX, FINISHED_TASKS_MAX};

use super::render::{out, task_json, task_text, tasks_table};
use super::{CliError, ExitCode};
use crate::api::{TaskFilter, TaskId, TaskState};
use crate::client::Client;

/// Most tasks one `task ls` prints: every task the cluster can hold.
const TASKS_LISTED_MAX: u64 = (ACTIVE_TASKS_MAX + FINISHED_TASKS_MAX) as u64;

#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// A task's state, function, node, attempts, timings, error and output (exit 1 if absent).
    Show { id: TaskId },
    /// Tasks in id order (oldest first).
    Ls {
        /// Only this function's tasks.
        #[arg(long)]
        function: Option<String>,
        /// Only tasks in this state: queued, assigned, running, succeeded, failed, timed_out.
        #[arg(long, value_parser = parse_task_state)]
        state: Option<TaskState>,
        /// Only dead-lettered tasks (asynchronous tasks that failed every attempt).
        #[arg(long)]
        dead: bool,
        /// Most tasks to print.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=TASKS_LISTED_MAX))]
        limit: u64,
    },
}

/// Parses a task state as `TaskState::as_str` writes it.
pub fn parse_task_state(s: &str) -> Result<TaskState, String> {
    const STATES: [TaskState; 6] = [
        TaskState::Queued,
        TaskState::Assigned,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::TimedOut,
    ];
    let wanted = s.replace('-', "_");
    STATES
        .into_iter()
        .find(|st| st.as_str() == wanted)
        .ok_or_else(|| {
            format!(
                "unknown task state {s:?} (queued, assigned, running, succeeded, failed or timed_out)"
            )
        })
}

/// Runs one `skiff task` command.
pub(super) async fn run(client: &Client, cmd: TaskCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        TaskCmd::Show { id } => {
            let Some(task) = client.task(id).await? else {
                return Err(CliError {
                    code: ExitCode::NotFound,
                    message: format!("task {id} not found (finished tasks are kept for an hour)"),
                });
            };
            if json {
                out(&task_json(&task, true).to_string());
            } else {
                out(&task_text(&task));
            }
        }
        TaskCmd::Ls {
            function,
            state,
            dead,
            limit,
        } => {
            if let Some(f) = &function {
                validate_function_name(f).map_err(CliError::usage)?;
            }
            let filter = TaskFilter {
                function,
                state,
                dead_letter: dead,
            };
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            let list = client.tasks_all(filter, limit).await?;
            if json {
                let items: Vec<serde_json::Value> =
                    list.iter().map(|t| task_json(t, false)).collect();
                out(&serde_json::Value::Array(items).to_string());
            } else {
                out(&tasks_table(&list));
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
    fn task_listing_flags_parse_and_are_bounded() {
        let cli = parse(&[
            "task",
            "ls",
            "--state",
            "timed_out",
            "--dead",
            "--limit",
            "5",
        ])
        .expect("parses");
        match cli.command {
            Cmd::Task(TaskCmd::Ls {
                state, dead, limit, ..
            }) => {
                assert_eq!(state, Some(TaskState::TimedOut));
                assert!(dead);
                assert_eq!(limit, 5);
            }
            other => panic!("not task ls: {other:?}"),
        }
        assert!(parse(&["task", "ls", "--limit", "0"]).is_err());
        assert!(parse(&["task", "ls", "--limit", "200001"]).is_err());
        assert!(parse(&["task", "ls", "--state", "lost"]).is_err());
        assert_eq!(parse_task_state("timed-out"), Ok(TaskState::TimedOut));
    }
}

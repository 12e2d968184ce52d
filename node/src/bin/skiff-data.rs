//! `skiff-data`: the shell client of the data service, for functions inside a sandbox.
//!
//! It speaks the line protocol of `docs/data-service.md` over the socket at
//! `/run/skiff/data.sock` (or `$SKIFF_DATA_SOCKET`) with blocking std I/O: no runtime, so it
//! starts fast in a short-lived function. Exit codes: 0 done, 1 the key is absent (`get`,
//! `rm`), 2 usage, 3 version conflict, 4 denied by the function's policy, 5 anything else.
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use base64::Engine as _;
use serde_json::{json, Value};

const SOCKET_DEFAULT: &str = "/run/skiff/data.sock";
const SOCKET_ENV: &str = "SKIFF_DATA_SOCKET";
/// Longest response line read: a list page is cut at 4 MiB after its first entry, and one
/// entry's value (1 MiB) can grow up to sixfold when JSON-escaped.
const RESPONSE_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Largest value read from stdin for `put KEY -`; the service refuses more than 1 MiB anyway,
/// this only stops a runaway pipe from filling memory first.
const STDIN_BYTES_MAX: u64 = 2 * 1024 * 1024;

const USAGE: &str = "usage: skiff-data get KEY        print the value (exit 1 if absent)
       skiff-data put KEY VALUE  store VALUE (- reads it from stdin); print the version
       skiff-data rm KEY         delete KEY (exit 1 if absent)
       skiff-data ls PREFIX      print KEY<TAB>VALUE for every key under PREFIX";

/// Why a command failed, with its exit code.
struct Failure {
    exit: u8,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Failure {
            exit: 2,
            message: format!("{}\n{USAGE}", message.into()),
        }
    }

    fn other(message: impl Into<String>) -> Self {
        Failure {
            exit: 5,
            message: message.into(),
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if matches!(args.first().and_then(|a| a.to_str()), Some("-h" | "--help")) {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("skiff-data: {}", failure.message);
            ExitCode::from(failure.exit)
        }
    }
}

fn run(args: Vec<OsString>) -> Result<(), Failure> {
    let mut args = args.into_iter();
    let command = args.next().ok_or_else(|| Failure::usage("no command"))?;
    let command = command.to_string_lossy().into_owned();
    let mut out = std::io::stdout().lock();
    match command.as_str() {
        "get" => {
            let key = text(&mut args, "KEY")?;
            let mut conn = Connection::open()?;
            let reply = conn.call(&json!({"op": "get", "key": key}))?;
            if reply["found"] != true {
                return Err(Failure {
                    exit: 1,
                    message: format!("{key:?} does not exist"),
                });
            }
            write_out(&mut out, &value_of(&reply)?)
        }
        "put" => {
            let key = text(&mut args, "KEY")?;
            let value = args.next().ok_or_else(|| Failure::usage("missing VALUE"))?;
            let value = if value == "-" {
                read_stdin()?
            } else {
                value.into_vec()
            };
            let mut request = json!({"op": "put", "key": key});
            match String::from_utf8(value) {
                Ok(text) => request["value"] = json!(text),
                Err(e) => {
                    let encoded = base64::engine::general_purpose::STANDARD.encode(e.into_bytes());
                    request["value_b64"] = json!(encoded);
                }
            }
            let reply = Connection::open()?.call(&request)?;
            write_out(&mut out, format!("{}\n", reply["version"]).as_bytes())
        }
        "rm" => {
            let key = text(&mut args, "KEY")?;
            Connection::open()?.call(&json!({"op": "delete", "key": key}))?;
            Ok(())
        }
        "ls" => {
            let prefix = text(&mut args, "PREFIX")?;
            let mut conn = Connection::open()?;
            let mut start_after = Value::Null;
            loop {
                let reply = conn
                    .call(&json!({"op": "list", "prefix": prefix, "start_after": start_after}))?;
                let entries = reply["entries"].as_array().ok_or_else(|| {
                    Failure::other(format!(
                        "the data service answered without entries: {reply}"
                    ))
                })?;
                for entry in entries {
                    let key = entry["key"].as_str().unwrap_or_default();
                    let mut line = Vec::with_capacity(key.len() + 2);
                    line.extend_from_slice(key.as_bytes());
                    line.push(b'\t');
                    line.extend_from_slice(&value_of(entry)?);
                    line.push(b'\n');
                    write_out(&mut out, &line)?;
                }
                match reply.get("next") {
                    Some(next @ Value::String(_)) => start_after = next.clone(),
                    _ => return Ok(()),
                }
            }
        }
        other => Err(Failure::usage(format!("unknown command {other:?}"))),
    }
}

fn text(args: &mut impl Iterator<Item = OsString>, what: &str) -> Result<String, Failure> {
    args.next()
        .ok_or_else(|| Failure::usage(format!("missing {what}")))?
        .into_string()
        .map_err(|_| Failure::usage(format!("{what} is not UTF-8")))
}

/// One connection to the data service; requests on it are answered in order.
struct Connection {
    reader: BufReader<UnixStream>,
}

impl Connection {
    fn open() -> Result<Self, Failure> {
        let path = std::env::var_os(SOCKET_ENV).unwrap_or_else(|| SOCKET_DEFAULT.into());
        let stream = UnixStream::connect(&path).map_err(|e| {
            Failure::other(format!(
                "cannot connect to the data service at {}: {e}",
                path.to_string_lossy()
            ))
        })?;
        Ok(Connection {
            reader: BufReader::new(stream),
        })
    }

    /// Sends `request` and returns the reply if it is `ok`; an error reply becomes the
    /// [`Failure`] its code calls for.
    fn call(&mut self, request: &Value) -> Result<Value, Failure> {
        let io = |e: std::io::Error| Failure::other(format!("data service connection: {e}"));
        let mut line = serde_json::to_vec(request).expect("a JSON value always serializes");
        line.push(b'\n');
        self.reader.get_mut().write_all(&line).map_err(io)?;
        line.clear();
        (&mut self.reader)
            .take(RESPONSE_BYTES_MAX)
            .read_until(b'\n', &mut line)
            .map_err(io)?;
        if line.last() != Some(&b'\n') {
            return Err(Failure::other(if line.is_empty() {
                "the data service closed the connection".to_string()
            } else {
                format!(
                    "the data service sent an incomplete or over-long reply ({} bytes)",
                    line.len()
                )
            }));
        }
        let reply: Value = serde_json::from_slice(&line)
            .map_err(|e| Failure::other(format!("the data service sent bad JSON: {e}")))?;
        if reply["ok"] == true {
            return Ok(reply);
        }
        let message = reply["error"]
            .as_str()
            .unwrap_or("unknown error")
            .to_string();
        let exit = match reply["code"].as_str() {
            Some("not_found") => 1,
            Some("conflict") => 3,
            Some("denied") => 4,
            _ => 5,
        };
        Err(Failure { exit, message })
    }
}

/// The raw bytes of a value from a reply or list entry (`value` or `value_b64`).
fn value_of(object: &Value) -> Result<Vec<u8>, Failure> {
    if let Some(text) = object["value"].as_str() {
        return Ok(text.as_bytes().to_vec());
    }
    let encoded = object["value_b64"]
        .as_str()
        .ok_or_else(|| Failure::other(format!("the data service sent no value: {object}")))?;
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| Failure::other(format!("the data service sent bad base64: {e}")))
}

fn read_stdin() -> Result<Vec<u8>, Failure> {
    let mut value = Vec::new();
    std::io::stdin()
        .lock()
        .take(STDIN_BYTES_MAX + 1)
        .read_to_end(&mut value)
        .map_err(|e| Failure::other(format!("cannot read the value from stdin: {e}")))?;
    if value.len() as u64 > STDIN_BYTES_MAX {
        return Err(Failure::other(format!(
            "the value on stdin is longer than {STDIN_BYTES_MAX} bytes"
        )));
    }
    Ok(value)
}

fn write_out(out: &mut impl Write, bytes: &[u8]) -> Result<(), Failure> {
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| Failure::other(format!("cannot write to stdout: {e}")))
}

//! A test cluster: `skiffd` processes with their own ports and data directories, which a test
//! can kill (`SIGKILL`) and restart from their data.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use skiff_client::api::{ClusterStatus, NodeId};
use skiff_client::tls::TlsConnector;
use skiff_client::{Client, ClientConfig};

pub struct TestNode {
    pub id: NodeId,
    pub addr: String,
    /// Where the node serves `/metrics`.
    pub metrics_addr: String,
    pub data_dir: PathBuf,
    pub child: Option<Child>,
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<TestNode>,
    config_path: PathBuf,
    /// The admin token `cluster init` returned; every client the harness makes presents it.
    pub token: String,
}

/// Makes the certificate of node `id` under the CA in `tls_dir` (the CA too, the first time)
/// unless it exists, and returns the `skiffd` flags that use it.
pub fn node_tls_args(tls_dir: &std::path::Path, id: NodeId) -> Vec<std::ffi::OsString> {
    if !skiff_node::certs::node_files(tls_dir, id).1.exists() {
        let node = skiff_node::certs::NodeCert {
            id,
            hosts: vec!["127.0.0.1".into(), "localhost".into()],
        };
        skiff_node::certs::generate(tls_dir, &[node], false).expect("make node certificate");
    }
    skiff_node::certs::node_flags(tls_dir, id)
}

pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free ports: every listener is held until all are chosen, so the kernel cannot
/// hand the same port out twice.
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

impl TestCluster {
    /// Starts `n` nodes with `config` (TOML, may be empty) and initializes the cluster. Unless
    /// `config` has a `[sources]` table of its own, the nodes read file sources beneath
    /// [`TestCluster::sources_dir`].
    pub async fn start(n: usize, config: &str) -> TestCluster {
        let mut cluster = TestCluster::start_uninitialized(n, config);
        cluster.init().await;
        cluster
    }

    /// Starts `n` nodes with `config` and leaves them uninitialized (no token yet).
    pub fn start_uninitialized(n: usize, config: &str) -> TestCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let sources = dir.path().join("sources");
        std::fs::create_dir(&sources).expect("make the sources root");
        let sources = sources.canonicalize().expect("resolve the sources root");
        let config_path = dir.path().join("node.toml");
        let config = if config.contains("[sources]") {
            config.to_string()
        } else {
            format!(
                "{config}\n[sources]\nroots = [{:?}]\n",
                sources.to_str().expect("utf-8")
            )
        };
        std::fs::write(&config_path, config).expect("write config");
        let mut cluster = TestCluster {
            nodes: Vec::new(),
            config_path,
            dir,
            token: String::new(),
        };
        let ports = free_ports(2 * n);
        for i in 1..=n as NodeId {
            let k = (i as usize - 1) * 2;
            let addr = format!("127.0.0.1:{}", ports[k]);
            let metrics_addr = format!("127.0.0.1:{}", ports[k + 1]);
            let data_dir = cluster.dir.path().join(format!("node-{i}"));
            cluster.nodes.push(TestNode {
                id: i,
                addr,
                metrics_addr,
                data_dir,
                child: None,
            });
            cluster.spawn(i);
        }
        cluster
    }

    /// Initializes the cluster with every node as a member; keeps the admin token.
    pub async fn init(&mut self) {
        let cluster = self;
        let members: BTreeMap<NodeId, String> = cluster
            .nodes
            .iter()
            .map(|n| (n.id, n.addr.clone()))
            .collect();
        let first = cluster.client_for(&[1]);
        let deadline = Instant::now() + Duration::from_secs(30);
        let admin = loop {
            match first.cluster_init(members.clone()).await {
                Ok(admin) => break admin,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cluster init failed: {e}"),
            }
        };
        cluster.token = admin.secret;
        cluster.wait_leader(&cluster.ids()).await;
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    pub fn node(&self, id: NodeId) -> &TestNode {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .expect("known node id")
    }

    fn node_mut(&mut self, id: NodeId) -> &mut TestNode {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .expect("known node id")
    }

    /// Starts (or restarts) node `id` from its data directory.
    pub fn spawn(&mut self, id: NodeId) {
        let exe = env!("CARGO_BIN_EXE_skiffd");
        let log_path = self.dir.path().join(format!("node-{id}.log"));
        let config_path = self.config_path.clone();
        let tls_dir = self.tls_dir();
        let node = self.node_mut(id);
        assert!(node.child.is_none(), "node {id} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open node log");
        let child = Command::new(exe)
            .args(["--id", &id.to_string(), "--listen", &node.addr])
            .args(["--metrics-listen", &node.metrics_addr])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--config")
            .arg(&config_path)
            .args(node_tls_args(&tls_dir, id))
            .env("SKIFF_LOG", "info,tarpc=warn,openraft=info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone log fd")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start skiffd");
        node.child = Some(child);
    }

    /// `kill -9` node `id`.
    pub fn kill(&mut self, id: NodeId) {
        let node = self.node_mut(id);
        let mut child = node.child.take().expect("node is running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    /// Stops node `id` as an operator would (SIGTERM) and waits for it to exit.
    pub fn terminate(&mut self, id: NodeId) {
        let node = self.node_mut(id);
        let mut child = node.child.take().expect("node is running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if child.try_wait().expect("wait").is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A client of the given nodes only, with the admin token (none before init).
    pub fn client_for(&self, ids: &[NodeId]) -> Client {
        let token = (!self.token.is_empty()).then(|| self.token.clone());
        self.client_with(ids, token)
    }

    /// A client of the given nodes only presenting `token`.
    pub fn client_with(&self, ids: &[NodeId], token: Option<String>) -> Client {
        let endpoints = ids.iter().map(|id| self.node(*id).addr.clone()).collect();
        let mut cfg = ClientConfig::new(endpoints);
        cfg.rpc_timeout = Duration::from_secs(5);
        cfg.attempts_max = 20;
        cfg.token = token;
        cfg.tls = Some(self.tls());
        Client::new(cfg).expect("valid endpoints and token")
    }

    /// The directory the nodes read stream sources and file dependencies from (their
    /// configured sources root), as a real path.
    pub fn sources_dir(&self) -> PathBuf {
        self.dir
            .path()
            .join("sources")
            .canonicalize()
            .expect("the sources root exists")
    }

    /// The cluster's CA and node certificates.
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    /// A client's TLS: trusts the cluster CA, presents no certificate.
    pub fn tls(&self) -> TlsConnector {
        TlsConnector::client(&self.tls_dir().join("ca.pem")).expect("cluster CA")
    }

    pub fn client(&self) -> Client {
        self.client_for(&self.ids())
    }

    /// Waits until one of `ids` reports a leader that is itself among `ids`.
    pub async fn wait_leader(&self, ids: &[NodeId]) -> NodeId {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for id in ids {
                if let Ok(s) = self.client_for(&[*id]).cluster_status().await {
                    if let Some(l) = s.leader {
                        if ids.contains(&l) {
                            return l;
                        }
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader among {ids:?} within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn status(&self, ids: &[NodeId]) -> ClusterStatus {
        self.client_for(ids)
            .cluster_status()
            .await
            .expect("cluster status")
    }

    pub fn log_of(&self, id: NodeId) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{id}.log"))).unwrap_or_default()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

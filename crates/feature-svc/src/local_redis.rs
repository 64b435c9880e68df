//! A `redis-server` on loopback, owned by the caller and stopped on drop: for the tests,
//! the benchmarks and the local cluster's Redis mode. The binary is `RECSYS_REDIS_SERVER`
//! (set by `deploy/local/bootstrap.sh`, which fetches Debian's package) or `redis-server`
//! on the PATH.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct LocalRedis {
    child: Child,
    port: u16,
    dir: PathBuf,
    persistence: Persistence,
    /// More server arguments (cluster mode).
    extra: Vec<String>,
}

/// How the server persists: what each setting promises is in the README ("Feature store").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing on disk (tests of behaviour, not durability).
    None,
    /// Append-only file fsync'd before every reply.
    AppendFsyncAlways,
}

impl LocalRedis {
    /// Starts a server with its files in `dir` on a free loopback port.
    pub fn start(dir: &Path, persistence: Persistence) -> anyhow::Result<Self> {
        Self::start_with(dir, persistence, &[])
    }

    fn start_with(dir: &Path, persistence: Persistence, extra: &[&str]) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        std::fs::create_dir_all(dir)?;
        let extra: Vec<String> = extra.iter().map(|arg| arg.to_string()).collect();
        let child = spawn(dir, persistence, port, &extra)?;
        let mut server = Self { child, port, dir: dir.to_path_buf(), persistence, extra };
        server.wait_ready()?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a crash would, then a start on the same port and files.
    pub fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        self.child = spawn(&self.dir, self.persistence, self.port, &self.extra)?;
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("redis-server exited at start-up ({status})");
            }
            if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                stream.set_read_timeout(Some(Duration::from_millis(500)))?;
                let mut reply = [0u8; 64];
                // PING is refused with -LOADING while the append-only file is replayed.
                if stream.write_all(b"PING\r\n").is_ok()
                    && stream.read(&mut reply).is_ok_and(|n| reply[..n].starts_with(b"+PONG"))
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!("redis-server on port {} did not answer within 20 s", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn spawn(dir: &Path, persistence: Persistence, port: u16, extra: &[String]) -> anyhow::Result<Child> {
    let binary = std::env::var_os("RECSYS_REDIS_SERVER").map_or_else(|| PathBuf::from("redis-server"), PathBuf::from);
    let mut command = Command::new(&binary);
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .arg("--dir")
        .arg(dir)
        .args(["--daemonize", "no", "--protected-mode", "yes", "--loglevel", "notice"])
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    match persistence {
        Persistence::None => command.args(["--appendonly", "no"]),
        Persistence::AppendFsyncAlways => command.args(["--appendonly", "yes", "--appendfsync", "always"]),
    };
    command.args(extra);
    command.spawn().map_err(|error| {
        anyhow::anyhow!(
            "cannot start {} ({error}): run deploy/local/bootstrap.sh (make test does) or install redis-server",
            binary.display()
        )
    })
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis Cluster of `nodes` primaries on loopback (no replicas), slots split evenly:
/// for the tests of the cluster mode.
pub struct LocalRedisCluster {
    nodes: Vec<LocalRedis>,
}

impl LocalRedisCluster {
    pub fn start(dir: &Path, nodes: usize) -> anyhow::Result<Self> {
        let nodes = (0..nodes)
            .map(|node| {
                LocalRedis::start_with(
                    &dir.join(format!("node-{node}")),
                    Persistence::None,
                    &["--cluster-enabled", "yes"],
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let connect = |node: &LocalRedis| -> anyhow::Result<redis::Connection> {
            Ok(redis::Client::open(node.url())?.get_connection()?)
        };
        let per_node = 16_384 / nodes.len();
        for (index, node) in nodes.iter().enumerate() {
            let first = index * per_node;
            let last = if index + 1 == nodes.len() { 16_383 } else { first + per_node - 1 };
            let mut connection = connect(node)?;
            redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(first).arg(last).query::<()>(&mut connection)?;
            for other in &nodes[..index] {
                redis::cmd("CLUSTER").arg("MEET").arg("127.0.0.1").arg(other.port).query::<()>(&mut connection)?;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &nodes {
            let mut connection = connect(node)?;
            loop {
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut connection)?;
                let known: usize = info
                    .lines()
                    .find_map(|line| line.strip_prefix("cluster_known_nodes:"))
                    .and_then(|count| count.trim().parse().ok())
                    .unwrap_or(0);
                if info.contains("cluster_state:ok") && known == nodes.len() {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "the local Redis Cluster did not form within 30 s");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(Self { nodes })
    }

    /// The seed nodes' URLs (`store.redis.cluster_nodes`).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(LocalRedis::url).collect()
    }
}

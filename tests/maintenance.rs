//! Maintenance, end to end: the real `canarygate maintenance` against real storage
//! (a directory, moto's S3 server, wsgidav's WebDAV server), touching only files in
//! temp dirs these tests made. The small-filesystem test mounts a tmpfs inside a
//! mount namespace of its own (`unshare --mount`), seen by nothing else.

mod support;

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::*;

/// A dir of logs and the rest, and a backup dir, in one temp dir.
struct Site {
    dir: TempDir,
    logs: PathBuf,
    backup: PathBuf,
}

impl Site {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let logs = dir.0.join("logs");
        let backup = dir.0.join("backup");
        std::fs::create_dir_all(logs.join("sub")).unwrap();
        std::fs::create_dir_all(&backup).unwrap();
        Self { dir, logs, backup }
    }

    /// Writes a file under logs/ with `len` bytes of numbered lines.
    fn log(&self, inside: &str, len: usize) -> Vec<u8> {
        let bytes = lines(inside, len);
        std::fs::write(self.logs.join(inside), &bytes).unwrap();
        bytes
    }

    fn config(&self, target: &str, extra: &str) -> PathBuf {
        self.dir.write(
            "c.toml",
            &format!(
                "[server]\nadmin_listen = \"127.0.0.1:{}\"\n[maintenance]\nadmin_listen = \
                 \"127.0.0.1:{}\"\ndirs = [\"{}\"]\ntarget_url = \"{target}\"\nhost = \"web1\"\n\
                 interval_ms = 300\nsettle_ms = 0\nretry_backoff_ms = 200\n{extra}",
                free_port(),
                free_port(),
                self.logs.display()
            ),
        )
    }
}

/// `len` bytes of numbered lines naming `tag`.
fn lines(tag: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0;
    while out.len() < len {
        i += 1;
        out.extend_from_slice(format!("{tag} line {i} of a log\n").as_bytes());
    }
    out.truncate(len);
    out
}

/// `canarygate maintenance --config F ARGS`: exit status and stdout (stderr: the log).
fn maintenance(config: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(binary())
        .args(["maintenance", "--config"])
        .arg(config)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn unzstd(bytes: &[u8]) -> Vec<u8> {
    zstd::stream::decode_all(bytes).unwrap()
}

/// Every archive in a backup dir: name (relative) -> decompressed bytes.
fn archives(backup: &Path) -> HashMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut HashMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let name = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(name, unzstd(&std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = HashMap::new();
    walk(backup, backup, &mut out);
    out
}

/// The archive of `inside` (one expected): its bytes.
fn archive_of<'a>(all: &'a HashMap<String, Vec<u8>>, prefix: &str) -> &'a [u8] {
    let found: Vec<_> = all
        .iter()
        .filter(|(name, _)| {
            name.strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with(".2") && rest.ends_with("Z.zst"))
        })
        .collect();
    assert_eq!(found.len(), 1, "one archive of {prefix}: {:?}", all.keys());
    found[0].1
}

/// `canarygate maintenance` as a long-running child; SIGTERM and wait on drop.
struct Daemon {
    child: Child,
    admin: u16,
    log: PathBuf,
}

impl Daemon {
    fn start(config: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_as(config, env, None)
    }

    /// As `uid` (its group `gid`, no other groups), through `setpriv`.
    fn start_as(config: &Path, env: &[(&str, &str)], user: Option<(u32, u32)>) -> Self {
        let text = std::fs::read_to_string(config).unwrap();
        let admin: u16 = text
            .split("[maintenance]\nadmin_listen = \"127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|p| p.parse().ok())
            .expect("the config names the admin port");
        let log = config.with_extension("log");
        let mut command = match user {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={gid}"),
                    "--clear-groups",
                    binary(),
                ]);
                c
            }
            None => Command::new(binary()),
        };
        let child = command
            .args(["maintenance", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, admin, log }
    }

    async fn metrics(&self) -> HashMap<String, f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin);
        let c = client();
        for _ in 0..200 {
            if let Ok(page) = try_get(&c, &url).await
                && page.status == 200
            {
                return parse_scrape(page.text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("maintenance's /metrics never answered: {}", self.log());
    }

    async fn metric(&self, key: &str) -> f64 {
        self.metrics().await.get(key).copied().unwrap_or(0.0)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return self.log();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

#[tokio::test]
async fn only_logs_are_archived_each_archive_is_the_original_and_the_rest_untouched() {
    within(60, async {
        let site = Site::new("maint-allow");
        let outside = TempDir::new("maint-outside");
        let secret = outside.write("secret.log", "not maintenance's business\n");
        std::os::unix::fs::symlink(&secret, site.logs.join("evil.log")).unwrap();
        std::os::unix::fs::symlink(&outside.0, site.logs.join("linked")).unwrap();
        let app = site.log("app.log", 300_000);
        let rotated = site.log("app.log.1", 5_000);
        let nested = site.log("sub/worker.log", 70_000);
        let core = site.log("core.4242", 2_000);
        let db = site.log("app.db", 40_000);
        let bin = site.log("app.bin", 30_000);
        let not_rotated = site.log("app.log.old", 1_000);
        // Past max_file_bytes: every candidate goes, whatever the disk.
        let config = site.config(
            &format!("file://{}", site.backup.display()),
            "max_file_bytes = 1\nexclude = [\"core.*\"]\n",
        );

        let (ok, dry, log) = maintenance(&config, &["--once", "--dry-run"], &[]);
        assert!(ok, "{dry}{log}");
        for name in ["app.log", "app.log.1", "sub/worker.log"] {
            assert!(
                dry.contains(&format!("would archive {}/{name} (", site.logs.display())),
                "{dry}"
            );
        }
        assert_eq!(dry.matches("would archive").count(), 3, "{dry}");
        assert!(
            dry.contains("closed (proven closed: write lease): it would be deleted"),
            "{dry}"
        );
        assert!(
            archives(&site.backup).is_empty(),
            "a dry run stores nothing"
        );
        assert_eq!(std::fs::read(site.logs.join("app.log")).unwrap(), app);

        let (ok, out, log) = maintenance(&config, &["--once"], &[]);
        assert!(ok, "{out}{log}");
        assert!(out.contains("archived 3, failed 0"), "{out}");
        let stored = archives(&site.backup);
        assert_eq!(stored.len(), 3, "{:?}", stored.keys());
        assert_eq!(archive_of(&stored, "web1/app.log"), app);
        assert_eq!(archive_of(&stored, "web1/app.log.1"), rotated);
        assert_eq!(archive_of(&stored, "web1/sub/worker.log"), nested);
        for gone in ["app.log", "app.log.1", "sub/worker.log"] {
            assert!(!site.logs.join(gone).exists(), "{gone} was freed");
        }
        // Untouched, byte for byte: not candidates, excluded, or behind symlinks.
        for (name, bytes) in [
            ("app.db", &db),
            ("app.bin", &bin),
            ("core.4242", &core),
            ("app.log.old", &not_rotated),
        ] {
            assert_eq!(
                &std::fs::read(site.logs.join(name)).unwrap(),
                bytes,
                "{name}"
            );
        }
        assert!(
            std::fs::symlink_metadata(site.logs.join("evil.log"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            std::fs::read_to_string(&secret).unwrap(),
            "not maintenance's business\n"
        );
        assert!(
            !out.contains("secret.log") && !out.contains("evil.log"),
            "{out}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_target_down_failing_or_read_only_deletes_nothing_and_alerts() {
    within(90, async {
        // Down: nothing listens there.
        let site = Site::new("maint-down");
        let app = site.log("app.log", 100_000);
        let config = site.config(
            &format!("http://127.0.0.1:{}/dav/", free_port()),
            "max_file_bytes = 1\n",
        );
        let (ok, out, log) = maintenance(&config, &["--once"], &[]);
        assert!(ok, "{out}{log}");
        assert!(out.contains("archived 0, failed 1"), "{out}");
        assert!(
            out.contains("uploading:") && out.contains("the file is untouched"),
            "{out}"
        );
        assert_eq!(std::fs::read(site.logs.join("app.log")).unwrap(), app);

        // Read-only: maintenance runs as a user who owns the logs but may not write
        // the backup dir (root bypasses permissions, so not as root).
        let site = Site::new("maint-ro");
        let app = site.log("app.log", 100_000);
        let uid = "45125";
        for path in [
            &site.logs,
            &site.logs.join("app.log"),
            &site.logs.join("sub"),
        ] {
            assert!(
                Command::new("chown")
                    .arg(uid)
                    .arg(path)
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let config = site.config(
            &format!("file://{}", site.backup.display()),
            "max_file_bytes = 1\n",
        );
        let out = Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                binary(),
                "maintenance",
                "--once",
                "--config",
            ])
            .arg(&config)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("archived 0, failed 1"), "{text}");
        assert_eq!(std::fs::read(site.logs.join("app.log")).unwrap(), app);
        assert!(archives(&site.backup).is_empty());

        // Answering 500, to a long-running maintenance: nothing deleted, counted,
        // retried with backoff, and a warning alert with the reason.
        let site = Site::new("maint-500");
        let app = site.log("app.log", 100_000);
        let failing = Peer::start(Mode::TwilioError).await;
        let hook = Peer::start(Mode::Created).await;
        let config = site.config(
            &format!("{}/dav/", failing.url()),
            &format!(
                "max_file_bytes = 1\n[alerts]\nretry_base_ms = 50\n[alerts.webhook]\nurl = \
                 \"{}/hook\"\nmin_severity = \"info\"\n",
                hook.url()
            ),
        );
        let mut daemon = Daemon::start(&config, &[]);
        let alert = hook.wait_for(1, "the failure alert").await;
        assert!(
            alert[0].body.contains("maintenance_archive_failed"),
            "{}",
            alert[0].body
        );
        assert!(alert[0].body.contains("\"warning\""), "{}", alert[0].body);
        eventually(
            Duration::from_secs(10),
            "a retry after the backoff",
            || async {
                daemon
                    .metric("canarygate_maintenance_failures_total{stage=\"upload\"}")
                    .await
                    >= 2.0
            },
        )
        .await;
        assert_eq!(
            daemon
                .metric("canarygate_maintenance_archived_files_total")
                .await,
            0.0
        );
        let log = daemon.stop();
        assert!(log.contains("archive failed; file untouched"), "{log}");
        assert_eq!(std::fs::read(site.logs.join("app.log")).unwrap(), app);
        assert!(
            !failing.received().is_empty(),
            "the PUTs reached the server"
        );
    })
    .await;
}

#[tokio::test]
async fn a_live_log_loses_no_line_and_repeats_none() {
    within(90, async {
        let site = Site::new("maint-live");
        let path = site.logs.join("live.log");
        // A writer holding the file open (O_APPEND), 40,000 numbered lines, a few
        // at a time, while maintenance archives every round (max_file_bytes 1).
        let script = format!(
            "exec 3>>{}\nfor i in $(seq 1 40000); do echo \"line $i of the live log\" >&3; \
             if [ $((i % 200)) -eq 0 ]; then sleep 0.02; fi; done\n",
            path.display()
        );
        std::fs::write(&path, b"").unwrap();
        let mut writer = Command::new("bash").arg("-c").arg(&script).spawn().unwrap();
        let config = site.config(
            &format!("file://{}", site.backup.display()),
            "max_file_bytes = 1\n",
        );
        let mut daemon = Daemon::start(&config, &[]);
        // Rounds while it writes: prefixes archived and punched out.
        eventually(Duration::from_secs(30), "archives while live", || async {
            daemon
                .metric("canarygate_maintenance_archived_files_total")
                .await
                >= 2.0
        })
        .await;
        let punched_while_live = std::fs::metadata(&path).map(|m| m.blocks() * 512 < m.len());
        assert!(writer.wait().unwrap().success());
        tokio::time::sleep(Duration::from_millis(800)).await;
        let log = daemon.stop();
        assert!(
            log.contains("live log: its archived prefix punched out"),
            "{log}"
        );
        assert_eq!(punched_while_live.ok(), Some(true), "space freed in place");

        let expected: Vec<u8> = (1..=40_000)
            .flat_map(|i| format!("line {i} of the live log\n").into_bytes())
            .collect();
        // The archives in time order (their names sort so), then what is left in the
        // file after the holes: exactly the lines written, once each.
        let stored = archives(&site.backup);
        let mut names: Vec<&String> = stored.keys().collect();
        names.sort();
        let mut all: Vec<u8> = names.iter().flat_map(|n| stored[*n].clone()).collect();
        let archived = all.len();
        if let Ok(rest) = std::fs::read(&path) {
            assert!(
                rest[..archived].iter().all(|b| *b == 0),
                "the archived prefix reads as a hole"
            );
            all.extend_from_slice(&rest[archived..]);
        }
        assert!(names.len() >= 2, "{names:?}");
        assert_eq!(all.len(), expected.len());
        assert!(all == expected, "every line once, in order");
    })
    .await;
}

#[tokio::test]
async fn s3_compatible_storage_holds_the_verified_archives() {
    within(90, async {
        let port = free_port();
        let _moto = KillOnDrop(
            Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("moto_server (pip install 'moto[server]') must be installed"),
        );
        wait_port(port).await;
        let http = reqwest::Client::new();
        let endpoint = format!("http://127.0.0.1:{port}");
        let made = http
            .put(format!("{endpoint}/archive"))
            .send()
            .await
            .unwrap();
        assert!(made.status().is_success(), "bucket: {}", made.status());

        let site = Site::new("maint-s3");
        // Random text that zstd cannot shrink below 8 MiB: a multipart upload.
        let app: Vec<u8> = (0..12_000_000)
            .map(|i| {
                if i % 100 == 99 {
                    b'\n'
                } else {
                    fastrand::alphanumeric() as u8
                }
            })
            .collect();
        std::fs::write(site.logs.join("app.log"), &app).unwrap();
        let small = site.log("sub/small.log", 10_000);
        let config = site.config(
            "s3://archive/logs",
            &format!(
                "max_file_bytes = 1\n[maintenance.s3]\nendpoint = \"{endpoint}\"\nregion = \
                 \"us-east-1\"\nallow_http = true\naccess_key_id_env = \"TEST_S3_KEY\"\n\
                 secret_access_key_env = \"TEST_S3_SECRET\"\n"
            ),
        );
        let env = [("TEST_S3_KEY", "testing"), ("TEST_S3_SECRET", "testing")];
        let (ok, out, log) = maintenance(&config, &["--once"], &env);
        assert!(ok, "{out}{log}");
        assert!(out.contains("archived 2, failed 0"), "{out}");
        let stored: u64 = out
            .lines()
            .find(|l| l.contains("/app.log bytes 0..12000000 "))
            .and_then(|l| l.split(" stored, verified").next())
            .and_then(|l| l.rsplit('(').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{out}"));
        assert!(
            stored > 8 << 20,
            "past one 8 MiB part: a multipart upload ({stored})"
        );
        let listing = http
            .get(format!("{endpoint}/archive?list-type=2&prefix=logs/web1/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let keys: Vec<&str> = listing
            .split("<Key>")
            .skip(1)
            .filter_map(|k| k.split("</Key>").next())
            .collect();
        assert_eq!(keys.len(), 2, "{listing}");
        // Objects are private: read back through an S3 client with the credentials.
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&endpoint)
            .with_bucket_name("archive")
            .with_region("us-east-1")
            .with_allow_http(true)
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .build()
            .unwrap();
        for key in keys {
            use object_store::ObjectStoreExt as _;
            let body = s3
                .get(&object_store::path::Path::from(key))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let expected = if key.starts_with("logs/web1/app.log.") {
                &app
            } else {
                assert!(key.starts_with("logs/web1/sub/small.log."), "{key}");
                &small
            };
            assert!(unzstd(&body) == *expected, "{key} is the original");
        }
        assert!(!site.logs.join("app.log").exists());

        // Without the credentials' variables set, it refuses to start and says which.
        let (ok, _, log) = maintenance(&config, &["--once"], &[]);
        assert!(!ok);
        assert!(
            log.contains("maintenance.s3.access_key_id_env") && log.contains("TEST_S3_KEY"),
            "{log}"
        );
    })
    .await;
}

#[tokio::test]
async fn webdav_storage_with_basic_auth_holds_the_verified_archives() {
    within(90, async {
        let site = Site::new("maint-dav");
        let share = site.dir.0.join("share");
        std::fs::create_dir_all(&share).unwrap();
        let port = free_port();
        let dav_config = site.dir.write(
            "wsgidav.yaml",
            &format!(
                "host: 127.0.0.1\nport: {port}\nprovider_mapping:\n  \"/\": \"{}\"\n\
                 http_authenticator:\n  accept_basic: true\n  accept_digest: false\n  \
                 default_to_digest: false\nsimple_dc:\n  user_mapping:\n    \"*\":\n      \
                 \"archiver\":\n        password: \"s3cret\"\nverbose: 1\n",
                share.display()
            ),
        );
        let _dav = KillOnDrop(
            Command::new("wsgidav")
                .arg("--config")
                .arg(&dav_config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("wsgidav (pip install wsgidav cheroot) must be installed"),
        );
        wait_port(port).await;
        let app = site.log("app.log", 300_000);
        let target = format!("http://127.0.0.1:{port}/");
        // A wrong password: refused, nothing deleted.
        let config = site.config(
            &target,
            "max_file_bytes = 1\n[maintenance.webdav]\nusername = \"archiver\"\npassword_env = \
             \"TEST_DAV_PASSWORD\"\n",
        );
        let (ok, out, log) = maintenance(&config, &["--once"], &[("TEST_DAV_PASSWORD", "wrong")]);
        assert!(ok, "{out}{log}");
        assert!(out.contains("archived 0, failed 1"), "{out}");
        assert_eq!(std::fs::read(site.logs.join("app.log")).unwrap(), app);

        let (ok, out, log) = maintenance(&config, &["--once"], &[("TEST_DAV_PASSWORD", "s3cret")]);
        assert!(ok, "{out}{log}");
        assert!(out.contains("archived 1, failed 0"), "{out}");
        let stored = archives(&share);
        assert_eq!(archive_of(&stored, "web1/app.log"), app);
        assert!(!site.logs.join("app.log").exists());
    })
    .await;
}

#[tokio::test]
async fn on_a_small_filesystem_the_oldest_logs_go_until_under_target() {
    within(60, async {
        assert_eq!(
            Command::new("id").arg("-u").output().unwrap().stdout,
            b"0\n",
            "this test mounts a tmpfs in a mount namespace: it needs root"
        );
        let site = Site::new("maint-small");
        let small = site.dir.0.join("small");
        std::fs::create_dir_all(&small).unwrap();
        let config = site.dir.write(
            "c.toml",
            &format!(
                "[maintenance]\nadmin_listen = \"127.0.0.1:{}\"\ndirs = [\"{small}\"]\n\
                 target_url = \"file://{backup}\"\nhost = \"web1\"\nsettle_ms = 0\n\
                 disk_percent = 80\ntarget_percent = 50\n",
                free_port(),
                small = small.display(),
                backup = site.backup.display()
            ),
        );
        // 4 MiB of tmpfs: ten 320 KiB logs, aged 10..1 minutes (log-0 the oldest),
        // and a 600 KiB database: about 93% used.
        let script = format!(
            "set -e\nmount -t tmpfs -o size=4m tmpfs {small}\ncd {small}\n\
             for i in 0 1 2 3 4 5 6 7 8 9; do head -c 327680 /dev/urandom | base64 -w 100 | \
             head -c 327680 > log-$i.log; touch -d \"$((10 - i)) minutes ago\" log-$i.log; done\n\
             head -c 614400 /dev/urandom > app.db\n\
             df --output=pcent {small} | tail -1 > {out}/before\n\
             {bin} maintenance --once --config {config} > {out}/report 2>&1\n\
             df --output=pcent {small} | tail -1 > {out}/after\nls {small} > {out}/left\n\
             sha256sum app.db > {out}/db\n",
            small = small.display(),
            out = site.dir.0.display(),
            bin = binary(),
            config = config.display()
        );
        let status = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "bash", "-c", &script])
            .status()
            .unwrap();
        let read = |name: &str| std::fs::read_to_string(site.dir.0.join(name)).unwrap_or_default();
        assert!(status.success(), "{}", read("report"));
        let percent =
            |name: &str| -> u32 { read(name).trim().trim_end_matches('%').parse().unwrap() };
        assert!(percent("before") > 85, "before: {}", read("before"));
        assert!(
            percent("after") <= 50,
            "after: {}\n{}",
            read("after"),
            read("report")
        );
        let left: Vec<String> = read("left").lines().map(str::to_owned).collect();
        // The oldest went first; the newest stayed; the database was never a candidate.
        assert!(left.contains(&"app.db".to_owned()), "{left:?}");
        assert!(left.contains(&"log-9.log".to_owned()), "{left:?}");
        assert!(!left.contains(&"log-0.log".to_owned()), "{left:?}");
        let gone: Vec<usize> = (0..10)
            .filter(|i| !left.contains(&format!("log-{i}.log")))
            .collect();
        assert_eq!(
            gone,
            (0..gone.len()).collect::<Vec<_>>(),
            "oldest first: {left:?}"
        );
        assert_eq!(archives(&site.backup).len(), gone.len());
        assert!(
            read("report").contains("its filesystem is 9"),
            "{}",
            read("report")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_stays_past_critical_raises_a_critical_alert() {
    within(60, async {
        let hook = Peer::start(Mode::Created).await;
        let site = Site::new("maint-crit");
        let small = site.dir.0.join("small");
        std::fs::create_dir_all(&small).unwrap();
        let config = site.dir.write(
            "c.toml",
            &format!(
                "[maintenance]\nadmin_listen = \"127.0.0.1:{}\"\ndirs = [\"{small}\"]\n\
                 target_url = \"file://{backup}\"\nsettle_ms = 0\ninterval_ms = 200\n\
                 [alerts]\n[alerts.webhook]\nurl = \"{hook}/hook\"\nmin_severity = \"info\"\n",
                free_port(),
                small = small.display(),
                backup = site.backup.display(),
                hook = hook.url()
            ),
        );
        // A database fills the tmpfs past 95%; the one log cannot make up for it.
        let script = format!(
            "set -e\nmount -t tmpfs -o size=4m tmpfs {small}\ncd {small}\n\
             head -c 4000000 /dev/zero > app.db\nhead -c 20000 /dev/urandom | base64 > app.log\n\
             timeout -s TERM 5 {bin} maintenance --config {config} > {out}/log 2>&1 || true\n\
             ls {small} > {out}/left\n",
            small = small.display(),
            out = site.dir.0.display(),
            bin = binary(),
            config = config.display()
        );
        let status = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "bash", "-c", &script])
            .status()
            .unwrap();
        let read = |name: &str| std::fs::read_to_string(site.dir.0.join(name)).unwrap_or_default();
        assert!(status.success(), "{}", read("log"));
        let alerts = hook.received();
        let critical = alerts
            .iter()
            .find(|a| a.body.contains("maintenance_disk_critical"))
            .unwrap_or_else(|| panic!("no critical alert: {alerts:?}\n{}", read("log")));
        assert!(critical.body.contains("\"critical\""), "{}", critical.body);
        assert!(critical.body.contains("disk past 95%"), "{}", critical.body);
        // It did what it could: the log is archived, the database untouched.
        assert_eq!(read("left").trim(), "app.db");
        assert_eq!(archives(&site.backup).len(), 1);
    })
    .await;
}

/// Requests to `url` from two loops, each one every 10 ms or so, until the token is
/// cancelled. Returns once 20 have been answered: a daemon started after it sees the
/// proxy busy from its first scrape on (a slow machine's first requests can take
/// longer than the daemon's first interval, which would then see a quiet proxy).
async fn steady_load(
    url: String,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinSet<()>,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let answered = Arc::new(AtomicUsize::new(0));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let (until, url, answered) = (stop.clone(), url.clone(), answered.clone());
        load.spawn(async move {
            let c = client();
            while !until.is_cancelled() {
                if try_get(&c, &url).await.is_ok() {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
    eventually(Duration::from_secs(15), "the load running", || async {
        answered.load(Ordering::Relaxed) >= 20
    })
    .await;
    (stop, load)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_proxy_defers_the_work_unless_the_disk_is_past_critical() {
    within(90, async {
        let prod = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(&[prod.addr], &[], "")).await;
        let site = Site::new("maint-busy");
        let app = site.log("app.log", 50_000);
        let metrics_url = format!("http://{}/metrics", proxy.admin_addr);
        let busy = |extra: &str| {
            format!(
                "max_file_bytes = 1\ndefer_above_rps = 5\nproxy_metrics_url = \"{metrics_url}\"\n{extra}"
            )
        };
        let config = site.config(&format!("file://{}", site.backup.display()), &busy(""));
        let (stop, load) = steady_load(proxy.url("/")).await;
        let mut daemon = Daemon::start(&config, &[]);
        eventually(Duration::from_secs(15), "rounds deferred", || async {
            daemon.metric("canarygate_maintenance_deferred_total").await >= 2.0
        })
        .await;
        assert_eq!(
            daemon
                .metric("canarygate_maintenance_archived_files_total")
                .await,
            0.0
        );
        assert_eq!(std::fs::read(site.logs.join("app.log")).unwrap(), app);
        // The proxy goes quiet: the next rounds do the work.
        stop.cancel();
        load.join_all().await;
        eventually(Duration::from_secs(15), "archived once quiet", || async {
            !site.logs.join("app.log").exists()
        })
        .await;
        let log = daemon.stop();
        assert!(log.contains("maintenance deferred"), "{log}");

        // Past critical_percent (this machine's disk is surely past 2%): at once,
        // however busy the proxy.
        let site = Site::new("maint-critical");
        site.log("app.log", 50_000);
        let config = site.config(
            &format!("file://{}", site.backup.display()),
            &busy("disk_percent = 1\ntarget_percent = 0.5\ncritical_percent = 2\nmax_file_bytes = 1000000000\n")
                .replace("max_file_bytes = 1\n", ""),
        );
        let (stop, load) = steady_load(proxy.url("/")).await;
        let mut daemon = Daemon::start(&config, &[]);
        eventually(Duration::from_secs(15), "archived at once", || async {
            !site.logs.join("app.log").exists()
        })
        .await;
        assert_eq!(daemon.metric("canarygate_maintenance_deferred_total").await, 0.0);
        stop.cancel();
        load.join_all().await;
        daemon.stop();
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_disk_gauge_starts_a_round_before_the_interval() {
    within(60, async {
        let prod = TestBackend::start("production").await;
        let site = Site::new("maint-early");
        site.log("app.log", 50_000);
        // The proxy's resource watch reports the logs' filesystem, twice a second.
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[],
            &format!(
                "[resources]\ninterval_ms = 500\ndisk_paths = [\"{}\"]\n",
                site.logs.display()
            ),
        ))
        .await;
        let metrics_url = format!("http://{}/metrics", proxy.admin_addr);
        let c = client();
        eventually(
            Duration::from_secs(10),
            "the proxy's disk gauge",
            || async {
                try_get(&c, &metrics_url)
                    .await
                    .is_ok_and(|page| page.text().contains("canarygate_host_disk_used_ratio{"))
            },
        )
        .await;
        // Rounds a minute apart: only the proxy's gauge (this disk is surely past 1%)
        // can start one within the test.
        let config = site.config(
            &format!("file://{}", site.backup.display()),
            &format!(
                "disk_percent = 1\ntarget_percent = 0.5\ncritical_percent = 2\n\
                 proxy_metrics_url = \"{metrics_url}\"\n"
            ),
        );
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("interval_ms = 300\n", "interval_ms = 60000\n");
        std::fs::write(&config, text).unwrap();
        let mut daemon = Daemon::start(&config, &[]);
        eventually(Duration::from_secs(20), "archived early", || async {
            !site.logs.join("app.log").exists()
        })
        .await;
        let log = daemon.stop();
        assert!(log.contains("crossed disk_percent: a round now"), "{log}");
        assert_eq!(archives(&site.backup).len(), 1);
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_follows_a_move_and_a_truncation_without_losing_a_line() {
    within(60, async {
        let prod = TestBackend::start("production").await;
        let dir = TempDir::new("access-log");
        let path = dir.0.join("access.log");
        let proxy = Proxy::start(&config_toml(
            &[prod.addr],
            &[],
            &format!("[server]\naccess_log = \"{}\"\n", path.display()),
        ))
        .await;
        let c = client();
        let send = |phase: &'static str, n: usize| {
            let c = c.clone();
            let url = proxy.url("/");
            async move {
                for i in 0..n {
                    let got = get(&c, &url, &[("x-request-id", &format!("{phase}-{i}"))]).await;
                    assert_eq!(got.status, 200);
                }
            }
        };
        let ids = |p: &Path| -> Vec<String> {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .map(|l| l.rsplit(' ').next().unwrap_or("").to_owned())
                .collect()
        };
        send("a", 30).await;
        eventually(Duration::from_secs(5), "phase a logged", || async {
            ids(&path).len() == 30
        })
        .await;
        let line = std::fs::read_to_string(&path).unwrap();
        assert!(
            line.lines()
                .next()
                .unwrap()
                .contains(" \"GET / HTTP/1.1\" 200 production "),
            "{line}"
        );
        // Moved away (logrotate's create mode, or maintenance's rename): new lines
        // go to a new file at the path.
        let moved = dir.0.join("access.log.1");
        std::fs::rename(&path, &moved).unwrap();
        // (The writer looks for a move at most every 200 ms; lines before it notices
        // land in the moved file, which the assertion below allows.)
        tokio::time::sleep(Duration::from_millis(300)).await;
        send("b", 30).await;
        eventually(Duration::from_secs(5), "phase b logged", || async {
            ids(&moved).len() + ids(&path).len() == 60
        })
        .await;
        assert!(!ids(&path).is_empty(), "a new file at the path");
        // Truncated in place (copytruncate): the next lines start at its new end.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        send("c", 20).await;
        eventually(Duration::from_secs(5), "phase c logged", || async {
            ids(&path).len() == 20
        })
        .await;
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.contains(&0), "no run of zeros before the new lines");
        let mut all: Vec<String> = ids(&moved);
        all.extend(ids(&path));
        let mut expected: Vec<String> = (0..30)
            .map(|i| format!("a-{i}"))
            .chain((0..30).map(|i| format!("b-{i}")))
            .collect();
        // Phase b's lines before the truncation are gone with it (the truncation's
        // doing, as in any log); those that were in the moved file are kept.
        let in_moved_b: Vec<String> = ids(&moved)
            .into_iter()
            .filter(|i| i.starts_with("b-"))
            .collect();
        expected.retain(|i| i.starts_with("a-") || in_moved_b.contains(i));
        expected.extend((0..20).map(|i| format!("c-{i}")));
        assert_eq!(all, expected, "every line once, in order");
        assert_eq!(proxy.state.metrics.log_dropped.get(), 0);
        proxy.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------
// What maintenance must never destroy (issue 29): real processes under users of
// their own, real files, a real HTTP store.

/// Runs `chown uid:gid` and `chmod mode` on `path`.
fn own(path: &Path, uid: u32, gid: u32, mode: &str) {
    for (cmd, arg) in [
        ("chown", format!("{uid}:{gid}")),
        ("chmod", mode.to_owned()),
    ] {
        assert!(
            Command::new(cmd)
                .arg(&arg)
                .arg(path)
                .status()
                .unwrap()
                .success(),
            "{cmd} {arg} {}",
            path.display()
        );
    }
}

/// The archives of one file in time order (their names sort so), then what is
/// left in the file after its holes.
fn reassembled(backup: &Path, path: &Path) -> Vec<u8> {
    let stored = archives(backup);
    let mut names: Vec<&String> = stored.keys().collect();
    names.sort();
    let mut all: Vec<u8> = names.iter().flat_map(|n| stored[*n].clone()).collect();
    let archived = all.len();
    let rest = std::fs::read(path).unwrap_or_default();
    if rest.len() >= archived {
        assert!(
            rest[..archived].iter().all(|b| *b == 0),
            "the archived prefix reads as a hole"
        );
        all.extend_from_slice(&rest[archived..]);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_held_open_by_another_users_process_keeps_every_later_line() {
    within(90, async {
        // The application (uid 45131) writes the log; maintenance runs as its own
        // user (45132), sharing only the log group (45133): it may write the dir and
        // the file, but cannot see the application's descriptors in /proc, and
        // neither owns the file nor has CAP_LEASE. Uids nothing else uses.
        let (app, maint, group) = (45131, 45132, 45133);
        let site = Site::new("maint-held");
        own(&site.dir.0, 0, 0, "755");
        own(&site.logs, 0, group, "2775");
        own(&site.backup, maint, maint, "700");
        let path = site.logs.join("held.log");
        let go = site.dir.0.join("go");
        let line = |i: u32| format!("line {i} of the held log\n");
        // Phase 1: 20,000 lines, then the writer keeps the file open, silent, until
        // told to go on; phase 2: 5,000 more.
        let script = format!(
            "umask 002\nexec 3>>{path}\nfor i in $(seq 1 20000); do echo \"line $i of the held \
             log\" >&3; done\nfor i in $(seq 1 1200); do [ -e {go} ] && break; sleep 0.05; done\n\
             for i in $(seq 20001 25000); do echo \"line $i of the held log\" >&3; done\n",
            path = path.display(),
            go = go.display()
        );
        let mut writer = KillOnDrop(
            Command::new("setpriv")
                .args([
                    &format!("--reuid={app}"),
                    &format!("--regid={group}"),
                    "--clear-groups",
                    "bash",
                    "-c",
                    &script,
                ])
                .spawn()
                .unwrap(),
        );
        let phase1: usize = (1..=20_000).map(|i| line(i).len()).sum();
        eventually(Duration::from_secs(20), "phase 1 written", || async {
            std::fs::metadata(&path).is_ok_and(|m| m.len() == phase1 as u64)
        })
        .await;
        let config = site.config(
            &format!("file://{}", site.backup.display()),
            "max_file_bytes = 1\n",
        );
        let daemon = Daemon::start_as(&config, &[], Some((maint, group)));
        // Rounds while the writer is silent: the old judgement (no writer seen, not
        // modified within settle_ms 0) deleted it here.
        eventually(Duration::from_secs(20), "archived while held", || async {
            daemon
                .metric("canarygate_maintenance_archived_files_total")
                .await
                >= 1.0
        })
        .await;
        let rounds = daemon.metric("canarygate_maintenance_rounds_total").await;
        eventually(Duration::from_secs(20), "two more rounds", || async {
            daemon.metric("canarygate_maintenance_rounds_total").await >= rounds + 2.0
        })
        .await;
        assert!(path.exists(), "held open: never deleted\n{}", daemon.log());
        std::fs::write(&go, "").unwrap();
        assert!(writer.0.wait().unwrap().success());
        let mut daemon = daemon;
        let log = daemon.stop();
        assert!(
            log.contains("live log: its archived prefix punched out"),
            "{log}"
        );
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.blocks() * 512 < meta.len(), "space freed in place");
        let expected: Vec<u8> = (1..=25_000).flat_map(|i| line(i).into_bytes()).collect();
        let all = reassembled(&site.backup, &path);
        assert_eq!(all.len(), expected.len(), "{log}");
        assert!(all == expected, "every line once, in order");
    })
    .await;
}

/// A store on loopback speaking the HTTP/WebDAV that maintenance uses (MKCOL, PUT,
/// GET, DELETE), which calls `on_put` with the object's path once a PUT's body has
/// all arrived and before it answers: the moment between archive and free.
struct Store {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

type OnPut = Arc<dyn Fn(&str) + Send + Sync>;

impl Store {
    async fn start(on_put: OnPut) -> Self {
        use http_body_util::{BodyExt as _, Full};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let objects = Arc::new(std::sync::Mutex::new(HashMap::<String, bytes::Bytes>::new()));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (objects, on_put) = (Arc::clone(&objects), Arc::clone(&on_put));
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (objects, on_put) = (Arc::clone(&objects), Arc::clone(&on_put));
                            async move {
                                let path = req.uri().path().to_owned();
                                let method = req.method().clone();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let mut response =
                                    http::Response::new(Full::new(bytes::Bytes::new()));
                                let status = match method.as_str() {
                                    "MKCOL" => 201,
                                    "PUT" => {
                                        objects.lock().unwrap().insert(path.clone(), body);
                                        on_put(&path);
                                        201
                                    }
                                    "GET" => match objects.lock().unwrap().get(&path) {
                                        Some(stored) => {
                                            *response.body_mut() = Full::new(stored.clone());
                                            let h = response.headers_mut();
                                            h.insert(
                                                "last-modified",
                                                "Wed, 21 Oct 2026 07:28:00 GMT".parse().unwrap(),
                                            );
                                            h.insert("etag", "\"1\"".parse().unwrap());
                                            200
                                        }
                                        None => 404,
                                    },
                                    "DELETE" => {
                                        objects.lock().unwrap().remove(&path);
                                        204
                                    }
                                    _ => 405,
                                };
                                *response.status_mut() =
                                    http::StatusCode::from_u16(status).unwrap();
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_truncated_between_archive_and_punch_loses_nothing() {
    within(60, async {
        let site = Site::new("maint-trunc");
        site.log("short.log", 200_000);
        site.log("long.log", 200_000);
        site.log("opened.log", 200_000);
        // At the PUT of each archive (its bytes all read): `> short.log` and a few
        // fresh lines; long.log rewritten from 0 with more than was archived (same
        // size or more: only the fingerprint tells); opened.log opened by a process
        // that keeps writing to it.
        let fresh_short = lines("fresh short", 5_000);
        let fresh_long = lines("fresh long", 300_000);
        let logs = site.logs.clone();
        let (fs, fl) = (fresh_short.clone(), fresh_long.clone());
        let holder: Arc<std::sync::Mutex<Option<KillOnDrop>>> = Arc::default();
        let held = Arc::clone(&holder);
        let opened_path = logs.join("opened.log");
        let go = site.dir.0.join("go");
        let go_path = go.clone();
        let store = Store::start(Arc::new(move |object: &str| {
            if object.contains("/short.log.") {
                std::fs::write(logs.join("short.log"), &fs).unwrap();
            } else if object.contains("/long.log.") {
                std::fs::write(logs.join("long.log"), &fl).unwrap();
            } else if object.contains("/opened.log.") {
                // A process that opens it and stays silent until told: held open
                // from before the unlink's check on, then writes a line.
                let child = Command::new("bash")
                    .arg("-c")
                    .arg(format!(
                        "exec 3>>{}\nfor i in $(seq 1 600); do [ -e {go} ] && break; sleep 0.05; \
                         done\necho 'written after the archive' >&3\n",
                        opened_path.display(),
                        go = go_path.display()
                    ))
                    .spawn()
                    .unwrap();
                // Until its fd 3 is the log: the child may start with an inherited
                // fd 3 of the test's (cargo's jobserver pipe), so "fd 3 exists" is not
                // "the log is open" (on a loaded machine the lease came first).
                let fd = format!("/proc/{}/fd/3", child.id());
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while std::fs::read_link(&fd).ok().as_deref() != Some(opened_path.as_path())
                    && std::time::Instant::now() < deadline
                {
                    std::thread::yield_now();
                }
                *held.lock().unwrap() = Some(KillOnDrop(child));
            }
        }))
        .await;
        let config = site.config(
            &format!("http://{}/store/", store.addr),
            "max_file_bytes = 1\n",
        );
        let (ok, out, log) = maintenance(&config, &["--once"], &[]);
        assert!(ok, "{out}{log}");
        assert!(out.contains("archived 3, failed 0"), "{out}");
        assert!(
            out.contains("(truncated meanwhile): nothing punched"),
            "{out}"
        );
        assert!(
            out.contains("holds other bytes now (truncated and written again): nothing punched"),
            "{out}"
        );
        // Every fresh byte is there, no run of zeros before it.
        assert!(std::fs::read(site.logs.join("short.log")).unwrap() == fresh_short);
        assert!(std::fs::read(site.logs.join("long.log")).unwrap() == fresh_long);
        // Opened between the scan and the unlink: kept, its new line after the hole.
        assert!(out.contains("the write lease was refused"), "{out}");
        std::fs::write(&go, "").unwrap();
        let holder = holder.lock().unwrap().take().unwrap();
        let mut holder = holder;
        assert!(holder.0.wait().unwrap().success());
        let opened = std::fs::read(site.logs.join("opened.log")).unwrap();
        assert!(opened.ends_with(b"written after the archive\n"), "{out}");
    })
    .await;
}

#[tokio::test]
async fn a_file_with_more_than_one_name_is_never_punched_nor_counted_as_freed() {
    within(60, async {
        let site = Site::new("maint-links");
        let outside = TempDir::new("maint-links-outside");
        let linked = site.log("linked.log", 100_000);
        std::fs::hard_link(site.logs.join("linked.log"), outside.0.join("keep.log")).unwrap();
        site.log("alone.log", 100_000);
        let alone_blocks = std::fs::metadata(site.logs.join("alone.log"))
            .unwrap()
            .blocks()
            * 512;
        // settle_ms 0: closed, deleted if it were a candidate; a minute: live, punched.
        for settle in ["0", "60000"] {
            let config = site.config(
                &format!("file://{}", site.backup.display()),
                "max_file_bytes = 1\n",
            );
            let text = std::fs::read_to_string(&config)
                .unwrap()
                .replace("settle_ms = 0\n", &format!("settle_ms = {settle}\n"));
            std::fs::write(&config, text).unwrap();
            let (ok, out, log) = maintenance(&config, &["--once"], &[]);
            assert!(ok, "{out}{log}");
            assert!(
                out.contains(
                    "linked.log: 2 names (hard links): never archived, punched or deleted"
                ),
                "{out}"
            );
            for name in [site.logs.join("linked.log"), outside.0.join("keep.log")] {
                let meta = std::fs::metadata(&name).unwrap();
                assert!(
                    std::fs::read(&name).unwrap() == linked,
                    "{}",
                    name.display()
                );
                assert!(
                    meta.blocks() * 512 >= meta.len(),
                    "not punched: {}",
                    name.display()
                );
            }
            let freed = if settle == "0" { alone_blocks } else { 0 };
            assert!(out.contains(&format!("freed {freed} bytes")), "{out}");
            let stored = archives(&site.backup);
            assert!(
                stored.keys().all(|k| !k.contains("linked.log")),
                "{stored:?}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_cannot_be_freed_is_not_archived_again_until_it_changes() {
    within(60, async {
        // Maintenance (uid 45134) may read the log but not write it or its dir.
        let maint = 45134;
        let site = Site::new("maint-stuck");
        own(&site.dir.0, 0, 0, "755");
        own(&site.logs, 0, 0, "755");
        own(&site.backup, maint, maint, "700");
        site.log("app.log", 100_000);
        own(&site.logs.join("app.log"), 0, 0, "644");
        let config = site.config(
            &format!("file://{}", site.backup.display()),
            "max_file_bytes = 1\n",
        );
        let mut daemon = Daemon::start_as(&config, &[], Some((maint, maint)));
        let key = "canarygate_maintenance_failures_total{stage=\"punch\"}";
        eventually(Duration::from_secs(20), "the punch refused", || async {
            daemon.metric(key).await >= 1.0
        })
        .await;
        // Rounds every 300 ms, the backoff 200 ms: many chances to archive it again.
        let rounds = daemon.metric("canarygate_maintenance_rounds_total").await;
        eventually(Duration::from_secs(20), "five more rounds", || async {
            daemon.metric("canarygate_maintenance_rounds_total").await >= rounds + 5.0
        })
        .await;
        assert_eq!(archives(&site.backup).len(), 1, "{}", daemon.log());
        assert_eq!(daemon.metric(key).await, 1.0);
        assert_eq!(
            daemon
                .metric("canarygate_maintenance_freed_bytes_total")
                .await,
            0.0
        );
        // It changes: archived again.
        std::fs::OpenOptions::new()
            .append(true)
            .open(site.logs.join("app.log"))
            .unwrap()
            .write_all(b"one more line\n")
            .unwrap();
        eventually(
            Duration::from_secs(20),
            "archived after the change",
            || async { archives(&site.backup).len() == 2 },
        )
        .await;
        let log = daemon.stop();
        assert!(log.contains("archived, not freed"), "{log}");
    })
    .await;
}

#[tokio::test]
async fn a_file_archive_and_its_directories_are_fsynced_before_the_source_is_touched() {
    within(60, async {
        let site = Site::new("maint-fsync");
        site.log("app.log", 100_000);
        let config = site.config(
            &format!("file://{}", site.backup.display()),
            "max_file_bytes = 1\n",
        );
        // strace shows each syscall with its descriptors' paths (-y), in order.
        let trace = site.dir.0.join("trace");
        let out = Command::new("strace")
            .args([
                "-f",
                "-y",
                "-e",
                "trace=fsync,fdatasync,unlinkat,renameat2",
                "-o",
            ])
            .arg(&trace)
            .arg(binary())
            .args(["maintenance", "--once", "--config"])
            .arg(&config)
            .output()
            .expect("strace");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("archived 1, failed 0"), "{text}");
        let trace = std::fs::read_to_string(&trace).unwrap();
        let lines: Vec<&str> = trace.lines().collect();
        let at = |what: &dyn Fn(&str) -> bool| lines.iter().position(|l| what(l));
        let backup = site.backup.display().to_string();
        let file =
            at(&|l| l.contains("fsync(") && l.contains("/web1/app.log.") && l.contains(".zst>"));
        let host_dir = at(&|l| l.contains("fsync(") && l.contains(&format!("{backup}/web1>")));
        let root = at(&|l| l.contains("fsync(") && l.contains(&format!("{backup}>")));
        let logs = site.logs.display().to_string();
        let touched = at(&|l| {
            (l.contains("unlinkat(") || l.contains("renameat2(")) && l.contains(&format!("{logs}>"))
        });
        let (Some(file), Some(host_dir), Some(root), Some(touched)) =
            (file, host_dir, root, touched)
        else {
            panic!("fsyncs of the archive and its dirs, then the source:\n{trace}");
        };
        assert!(
            file < host_dir && host_dir < root && root < touched,
            "{trace}"
        );
        assert!(!site.logs.join("app.log").exists());
    })
    .await;
}

#[tokio::test]
async fn on_ext4_with_a_large_reserve_the_proxy_maintenance_and_df_agree() {
    within(90, async {
        // A 64 MiB ext4 image with half its blocks reserved for root (mkfs.ext4 -m
        // 50), loop-mounted in a mount namespace of this test's own; the proxy (its
        // resource watch) and maintenance run inside it, as does df.
        let site = Site::new("maint-ext4");
        let (img, mnt, out) = (site.dir.0.join("img"), site.dir.0.join("mnt"), &site.dir.0);
        std::fs::create_dir_all(&mnt).unwrap();
        let admin = free_port();
        let proxy_config = site.dir.write(
            "proxy.toml",
            &format!(
                "[server]\nlisten = \"127.0.0.1:{}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n{}",
                free_port(),
                config_toml(
                    &[dead_addr().await],
                    &[],
                    &format!(
                        "[resources]\ninterval_ms = 200\ndisk_paths = [\"{}\"]\n",
                        mnt.display()
                    )
                )
            ),
        );
        let maint_config = site.dir.write(
            "maint.toml",
            &format!(
                "[maintenance]\nadmin_listen = \"127.0.0.1:{}\"\ndirs = [\"{}\"]\n\
                 target_url = \"file://{}\"\nproxy_metrics_url = \"http://127.0.0.1:{admin}/metrics\"\n",
                free_port(),
                mnt.display(),
                site.backup.display()
            ),
        );
        let script = format!(
            "set -e\ntruncate -s 64M {img}\nmkfs.ext4 -q -F -m 50 {img}\nmount -o loop {img} {mnt}\n\
             head -c 10485760 /dev/urandom > {mnt}/fill.bin\nsync -f {mnt}\n\
             {bin} run --config {proxy} > {out}/proxy.log 2>&1 &\nproxy=$!\n\
             {bin} maintenance --once --dry-run --config {maint} > {out}/maint 2>&1\n\
             df -B1 --output=used,avail,size {mnt} | tail -1 > {out}/df\ntouch {out}/ready\n\
             for i in $(seq 1 1200); do [ -e {out}/stop ] && break; sleep 0.05; done\n\
             kill $proxy; wait $proxy || true\numount {mnt}\n",
            img = img.display(),
            mnt = mnt.display(),
            out = out.display(),
            bin = binary(),
            proxy = proxy_config.display(),
            maint = maint_config.display()
        );
        let mut child = KillOnDrop(
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "bash", "-c", &script])
                .spawn()
                .unwrap(),
        );
        let ready = out.join("ready");
        eventually(Duration::from_secs(30), "the namespace ready", || async {
            ready.exists()
        })
        .await;
        let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
        let df: Vec<f64> = read("df").split_whitespace().map(|n| n.parse().unwrap()).collect();
        let (used, avail, size) = (df[0], df[1], df[2]);
        let df_ratio = used / (used + avail);
        // The reserve matters here: total minus available over total says far more.
        let old_ratio = (size - avail) / size;
        assert!(old_ratio - df_ratio > 0.15, "df {df_ratio}, old {old_ratio}");
        // Maintenance's figure (one decimal in its report).
        let report = read("maint");
        let percent: f64 = report
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{}: ", mnt.display())))
            .and_then(|l| l.strip_suffix("% used"))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{report}"));
        assert!((percent - df_ratio * 100.0).abs() <= 0.05 + 1e-9, "{percent} vs df {df_ratio}\n{report}");
        // The proxy's gauge.
        let c = client();
        let url = format!("http://127.0.0.1:{admin}/metrics");
        let key = format!("canarygate_host_disk_used_ratio{{path=\"{}\"}}", mnt.display());
        let gauge = Arc::new(std::sync::Mutex::new(None));
        eventually(Duration::from_secs(20), "the proxy's disk gauge", || {
            let (got, key, gauge) = (try_get(&c, &url), key.clone(), Arc::clone(&gauge));
            async move {
                let value = got.await.ok().and_then(|p| parse_scrape(p.text()).get(&key).copied());
                *gauge.lock().unwrap() = value;
                value.is_some()
            }
        })
        .await;
        let gauge = gauge.lock().unwrap().unwrap();
        assert!((gauge - df_ratio).abs() < 1e-3, "gauge {gauge} vs df {df_ratio}\n{}", read("proxy.log"));
        std::fs::write(out.join("stop"), "").unwrap();
        assert!(child.0.wait().unwrap().success(), "{}", read("proxy.log"));
    })
    .await;
}

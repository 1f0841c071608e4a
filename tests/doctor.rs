//! The doctor, end to end, and never able to signal a process the test did not start:
//! each test runs the real `canarygate doctor` inside a PID namespace of its own
//! (`unshare --pid --fork --mount-proc`), where the only processes are the test's
//! script, its victims and the doctor. Victims run as uid 45123, which nothing else
//! on the machine uses, and the doctor watches that uid alone unless a test says
//! otherwise. Killing the namespace's `unshare` (by PID) ends everything in it.
//!
//! The tests run one at a time (CPU burners on a 2-core machine would otherwise
//! starve each other), with a low `cpu_percent` for the same reason.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;

const VICTIM_UID: u32 = 45_123;
const OTHER_UID: u32 = 45_124;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A burner that dies on SIGTERM (its exit file then reads 143).
const BURN: &str = "sh -c 'while :; do :; done'";
/// A burner that ignores SIGTERM (only SIGKILL ends it: 137).
const BURN_IGNORING_TERM: &str = "sh -c 'trap \"\" TERM; while :; do :; done'";

/// A PID namespace running a script of victims and the doctor.
struct Namespace {
    child: Child,
    dir: TempDir,
    pub admin: u16,
    ended: bool,
}

impl Namespace {
    /// `victims` are lines from [`victim`]; `doctor_toml` the config's body (the
    /// doctor's admin port is added); `doctor_prefix` runs the doctor as another
    /// user when set; `doctor_args` e.g. `--once`.
    fn start(
        victims: &[String],
        doctor_toml: &str,
        doctor_prefix: &str,
        doctor_args: &str,
    ) -> Self {
        assert_eq!(
            Command::new("id").args(["-u"]).output().unwrap().stdout,
            b"0\n",
            "the doctor tests need root (for unshare and setpriv)"
        );
        let dir = TempDir::new("doctor");
        let admin = free_port();
        let toml = format!("{doctor_toml}\n").replace(
            "[doctor]\n",
            &format!("[doctor]\nadmin_listen = \"127.0.0.1:{admin}\"\n"),
        );
        let config = dir.write("c.toml", &toml);
        // A copy of `yes` under a protected name, for the protected-name test.
        std::fs::copy("/usr/bin/yes", dir.0.join("busyguard")).unwrap();
        // On SIGTERM the script stops the doctor gracefully (so it ends as in
        // production, and writes its coverage profile), then leaves.
        let script = format!(
            "cd {dir}\ntrap 'd=$(cat doctor.pid); kill -TERM $d 2>/dev/null; wait $d; exit 0' TERM\n{victims}\nsleep 0.3\n{prefix} {bin} doctor --config {config} {args} > doctor.log 2>&1 &\n\
             echo $! > doctor.pid\nwait\n",
            dir = dir.0.display(),
            victims = victims.join("\n"),
            prefix = doctor_prefix,
            bin = binary(),
            config = config.display(),
            args = doctor_args,
        );
        let script = dir.write("run.sh", &script);
        let child = Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "--kill-child", "bash"])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare (util-linux) must be installed");
        Self {
            child,
            dir,
            admin,
            ended: false,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// A victim's exit status (143: SIGTERM, 137: SIGKILL), once it has exited.
    fn exit_of(&self, victim: &str) -> Option<String> {
        std::fs::read_to_string(self.path(&format!("{victim}.exit")))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }

    async fn wait_exit(&self, victim: &str, within: Duration) -> String {
        eventually(within, &format!("{victim} exited"), || async {
            self.exit_of(victim).is_some()
        })
        .await;
        self.exit_of(victim).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("doctor.log")).unwrap_or_default()
    }

    async fn metrics(&self) -> std::collections::HashMap<String, f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin);
        let c = client();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(page) = try_get(&c, &url).await
                && page.status == 200
            {
                return parse_scrape(page.text());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the doctor's /metrics never answered: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn action(&self, action: &str, result: &str) -> f64 {
        let key =
            format!("canarygate_doctor_actions_total{{action=\"{action}\",result=\"{result}\"}}");
        self.metrics().await.get(&key).copied().unwrap_or(0.0)
    }
}

impl Namespace {
    /// Stops the doctor the way systemd would (SIGTERM), ends the namespace, and
    /// returns the doctor's whole log.
    fn stop(mut self) -> String {
        self.end();
        self.log()
    }

    fn end(&mut self) {
        // Once only: after `wait`, unshare's PID may belong to someone else.
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        // The namespace's init (our script) is unshare's one child: SIGTERM it, so
        // it stops the doctor, and give it 5 s.
        let pid = self.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(init) = children.split_whitespace().next() {
            let _ = Command::new("kill").args(["-TERM", init]).status();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None))
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // unshare --kill-child: its death takes the namespace's init, and with it
        // every process in the namespace.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        self.end();
    }
}

/// A script line starting `cmd` as `uid` (root when `None`) in a root subshell
/// that records its PID and, when it ends, its exit status.
fn victim(name: &str, uid: Option<u32>, cmd: &str) -> String {
    let setpriv = uid.map_or_else(String::new, |u| {
        format!("setpriv --reuid={u} --regid={u} --clear-groups ")
    });
    format!("( {setpriv}{cmd} & p=$!; echo $p > {name}.pid; wait $p; echo $? > {name}.exit ) &")
}

fn doctor_toml(extra: &str) -> String {
    // No proxy here: its metrics are unreadable, which the alerts say.
    format!(
        "[server]\nadmin_listen = \"127.0.0.1:{}\"\n[doctor]\ninterval_ms = 250\nsustain_ms = 1000\n\
         cpu_percent = 30\nwatch_users = [\"{VICTIM_UID}\"]\ngrace_ms = 1500\nafter_ms = 300\n{extra}",
        dead_port()
    )
}

fn dead_port() -> u16 {
    free_port()
}

async fn lock() -> tokio::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burner_gets_sigterm_and_one_ignoring_it_gets_sigkill() {
    let _one = lock().await;
    within(60, async {
        let ns = Namespace::start(
            &[
                victim("polite", Some(VICTIM_UID), BURN),
                victim("stubborn", Some(VICTIM_UID), BURN_IGNORING_TERM),
            ],
            &doctor_toml(""),
            "",
            "",
        );
        // sustain 1 s + a round + the grace of 1.5 s, with a wide margin.
        assert_eq!(ns.wait_exit("polite", Duration::from_secs(8)).await, "143");
        assert_eq!(
            ns.wait_exit("stubborn", Duration::from_secs(10)).await,
            "137"
        );
        assert_eq!(ns.action("sigterm", "ok").await, 2.0);
        assert_eq!(ns.action("sigkill", "ok").await, 1.0);
        let log = ns.stop();
        assert!(log.contains("doctor acted"), "{log}");
        assert!(log.contains("proxy metrics unreadable"), "{log}");
        assert!(
            log.contains("doctor stopped"),
            "a SIGTERM stops it cleanly: {log}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_and_protected_names_are_reported_never_signalled() {
    let _one = lock().await;
    within(60, async {
        // Root watched and no protected users: root is still out of reach.
        let toml = doctor_toml("protected_users = []\nprotected_names = [\"busyguard\"]\n")
            .replace(
                &format!("watch_users = [\"{VICTIM_UID}\"]"),
                &format!("watch_users = [\"{VICTIM_UID}\", \"root\"]"),
            );
        let ns = Namespace::start(
            &[
                victim("root", None, BURN),
                victim("guarded", Some(VICTIM_UID), "./busyguard > /dev/null"),
            ],
            &toml,
            "",
            "",
        );
        eventually(Duration::from_secs(10), "both reported", || async {
            ns.action("report", "protected").await >= 2.0
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(ns.exit_of("root"), None, "root burner untouched");
        assert_eq!(ns.exit_of("guarded"), None, "protected name untouched");
        assert_eq!(ns.action("sigterm", "ok").await, 0.0);
        let m = ns.metrics().await;
        assert_eq!(m["canarygate_doctor_hogs"], 2.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_and_once_signal_nothing() {
    let _one = lock().await;
    within(60, async {
        let ns = Namespace::start(
            &[victim("burner", Some(VICTIM_UID), BURN)],
            &doctor_toml("mode = \"report\"\n"),
            "",
            "",
        );
        eventually(Duration::from_secs(10), "reported", || async {
            ns.action("report", "dry_run").await >= 1.0
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(ns.exit_of("burner"), None);
        drop(ns);

        // --once: samples for sustain_ms, prints, exits; the burner outlives it.
        let ns = Namespace::start(
            &[victim("burner", Some(VICTIM_UID), BURN)],
            &doctor_toml(""),
            "",
            "--once",
        );
        eventually(
            Duration::from_secs(15),
            "--once printed its report",
            || async { ns.log().contains("would send SIGTERM") },
        )
        .await;
        let log = ns.log();
        let pid = std::fs::read_to_string(ns.path("burner.pid")).unwrap();
        assert!(
            log.contains(&format!("pid {} user {VICTIM_UID}", pid.trim())),
            "{log}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(ns.exit_of("burner"), None, "{log}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_stops_after_max_kills() {
    let _one = lock().await;
    within(60, async {
        // Something restarts the hog each time it dies.
        let restarter = format!(
            "( i=0; while [ $i -lt 5 ]; do i=$((i+1)); setpriv --reuid={VICTIM_UID} --regid={VICTIM_UID} \
             --clear-groups {BURN} & p=$!; echo $p > hog$i.pid; wait $p; echo $? > hog$i.exit; done ) &"
        );
        let ns = Namespace::start(&[restarter], &doctor_toml("max_kills = 2\nwindow_ms = 60000\n"), "", "");
        assert_eq!(ns.wait_exit("hog1", Duration::from_secs(8)).await, "143");
        assert_eq!(ns.wait_exit("hog2", Duration::from_secs(8)).await, "143");
        eventually(Duration::from_secs(10), "the breaker reported", || async {
            ns.action("report", "breaker_open").await >= 1.0
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(ns.exit_of("hog3"), None, "the third hog is only reported");
        assert_eq!(ns.action("sigterm", "ok").await, 2.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cap_kill_it_says_eperm_and_goes_on() {
    let _one = lock().await;
    within(60, async {
        // The doctor as another unprivileged user: it may not signal the victim.
        let ns = Namespace::start(
            &[victim("burner", Some(VICTIM_UID), BURN)],
            &doctor_toml(""),
            &format!("setpriv --reuid={OTHER_UID} --regid={OTHER_UID} --clear-groups"),
            "",
        );
        eventually(Duration::from_secs(10), "denied", || async {
            ns.action("sigterm", "denied").await >= 1.0
        })
        .await;
        assert_eq!(ns.exit_of("burner"), None);
        eventually(Duration::from_secs(5), "the audit line", || async {
            ns.log().contains("EPERM")
        })
        .await;
        // Still running its rounds.
        assert_eq!(
            ns.metrics().await["canarygate_doctor_proxy_metrics_up"],
            0.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_when_impacting_waits_for_the_proxys_p99_and_the_email_tells_before_and_after() {
    let _one = lock().await;
    within(90, async {
        // A real SMTP server.
        let mail = TempDir::new("doctor-mail");
        let smtp_port = free_port();
        let mut smtp = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{smtp_port}"), "-c", "aiosmtpd.handlers.Mailbox"])
            .arg(mail.0.join("box"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m aiosmtpd (pip install aiosmtpd)");
        // Listening before the doctor's first report (a slow start would spend that
        // email's tries).
        wait_port(smtp_port).await;
        // A real proxy in front of a backend whose latency the test sets per request.
        let backend = TestBackend::start("production").await;
        let proxy = Proxy::start(&config_toml(&[backend.addr], &[], "")).await;
        let slow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = tokio_util::sync::CancellationToken::new();
        for _ in 0..8 {
            let (url_fast, url_slow) = (proxy.url("/sleep?ms=1"), proxy.url("/sleep?ms=300"));
            let (slow, stop) = (slow.clone(), stop.clone());
            tokio::spawn(async move {
                let c = client();
                while !stop.is_cancelled() {
                    let url = if slow.load(std::sync::atomic::Ordering::Relaxed) { &url_slow } else { &url_fast };
                    let _ = try_get(&c, url).await;
                }
            });
        }
        let toml = format!(
            "[server]\nadmin_listen = \"{}\"\n[doctor]\ninterval_ms = 250\nsustain_ms = 1000\ncpu_percent = 30\n\
             watch_users = [\"{VICTIM_UID}\"]\ngrace_ms = 1500\nafter_ms = 1000\nonly_when_impacting = true\n\
             impact_p99_ms = 100\nimpact_cpu_ratio = 1.0\n\
             [alerts.email]\nsmtp_url = \"smtp://127.0.0.1:{smtp_port}\"\nfrom = \"doctor@example.com\"\n\
             to = [\"oncall@example.com\"]\n",
            proxy.admin_addr
        );
        let ns = Namespace::start(&[victim("burner", Some(VICTIM_UID), BURN)], &toml, "", "");
        eventually(Duration::from_secs(10), "reported as not impacting", || async {
            ns.action("report", "not_impacting").await >= 1.0
        })
        .await;
        assert_eq!(ns.metrics().await["canarygate_doctor_proxy_metrics_up"], 1.0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(ns.exit_of("burner"), None, "fast service: reported only");
        // The backend slows down: the proxy's production p99 crosses 100 ms.
        slow.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(ns.wait_exit("burner", Duration::from_secs(15)).await, "143");
        // Then the service recovers, and the email says both.
        slow.store(false, std::sync::atomic::Ordering::Relaxed);
        let new = mail.0.join("box").join("new");
        let kill_email = || {
            std::fs::read_dir(&new).ok().and_then(|d| {
                d.filter_map(Result::ok)
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .find(|m| m.contains("doctor stopped pid"))
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let message = loop {
            if let Some(m) = kill_email() {
                break m;
            }
            // On failure, what the doctor did and said is the diagnosis.
            assert!(
                std::time::Instant::now() < deadline,
                "no kill email in 30 s; alerts {:?}; doctor log:\n{}",
                ns.metrics()
                    .await
                    .into_iter()
                    .filter(|(k, _)| k.starts_with("canarygate_alerts_total"))
                    .collect::<Vec<_>>(),
                ns.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let text = message.replace("=\r\n", "").replace("=\n", "");
        assert!(text.contains("CRITICAL"), "{text}");
        assert!(text.contains("before: production p99"), "{text}");
        assert!(text.contains("after (1 s later): production p99"), "{text}");
        assert!(text.contains("SIGTERM: exited"), "{text}");
        stop.cancel();
        drop(ns);
        let _ = smtp.kill();
        let _ = smtp.wait();
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pid_taken_over_by_a_new_process_starts_a_new_count() {
    let _one = lock().await;
    within(60, async {
        // A burns 0.8 s (under sustain_ms) and exits; B gets A's PID at once (the
        // namespace's ns_last_pid makes the kernel hand it out next) and burns. A
        // doctor that went by PID would stop B about 0.2 s in, on A's count; by
        // identity (PID + start time) B must burn its own full second first.
        let setpriv = format!("setpriv --reuid={VICTIM_UID} --regid={VICTIM_UID} --clear-groups");
        let script = format!(
            "( {setpriv} bash -c 'end=$((${{EPOCHREALTIME/./}}+800000)); while (( ${{EPOCHREALTIME/./}} < end )); do :; done' \
             & p=$!; echo $p > a.pid; wait $p; echo $? > a.exit; date +%s%N > b.start; \
             echo $((p-1)) > /proc/sys/kernel/ns_last_pid; {setpriv} {BURN} & q=$!; echo $q > b.pid; \
             wait $q; s=$?; date +%s%N > b.end; echo $s > b.exit ) &"
        );
        let ns = Namespace::start(&[script], &doctor_toml(""), "", "");
        assert_eq!(ns.wait_exit("a", Duration::from_secs(5)).await, "0", "A ended by itself");
        assert_eq!(ns.wait_exit("b", Duration::from_secs(10)).await, "143");
        let read = |name: &str| std::fs::read_to_string(ns.path(name)).unwrap().trim().to_owned();
        assert_eq!(read("a.pid"), read("b.pid"), "the PID was reused");
        let lived_ms = (read("b.end").parse::<u64>().unwrap() - read("b.start").parse::<u64>().unwrap()) / 1_000_000;
        assert!(lived_ms >= 1_000, "B stopped after {lived_ms} ms, before its own sustain_ms");
        assert_eq!(ns.action("sigterm", "ok").await, 1.0, "only B, once");
    })
    .await;
}

/// Every alert `hook` received so far, as JSON.
fn hook_alerts(hook: &Peer) -> Vec<serde_json::Value> {
    hook.received()
        .iter()
        .filter_map(|r| serde_json::from_str(&r.body).ok())
        .collect()
}

fn webhook_toml(hook: &Peer) -> String {
    format!("\n[alerts.webhook]\nurl = \"{}/hook\"\n", hook.url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hogs_crossing_together_with_max_kills_1_lose_exactly_one() {
    let _one = lock().await;
    within(60, async {
        let hook = Peer::start(Mode::Created).await;
        // Three burners started together cross cpu_percent and sustain_ms in the same
        // round: a breaker that counted only kills already done let all three through.
        let toml = doctor_toml(&format!(
            "max_kills = 1\nwindow_ms = 600000\n{}",
            webhook_toml(&hook)
        ))
        .replace("cpu_percent = 30", "cpu_percent = 15");
        let hogs = ["h1", "h2", "h3"];
        let ns = Namespace::start(
            &hogs.map(|h| victim(h, Some(VICTIM_UID), BURN)),
            &toml,
            "",
            "",
        );
        eventually(Duration::from_secs(15), "two hogs spared", || async {
            ns.action("report", "breaker_open").await >= 2.0
        })
        .await;
        eventually(Duration::from_secs(10), "one hog stopped", || async {
            hogs.iter().any(|h| ns.exit_of(h).is_some())
        })
        .await;
        // Both spared hogs were decided in the round that stopped the first one (the
        // same round, or the breaker would not have reported them) and the window
        // is 10 minutes: nothing else can be signalled now.
        let stopped: Vec<_> = hogs.iter().filter(|h| ns.exit_of(h).is_some()).collect();
        assert_eq!(stopped.len(), 1, "exactly one hog stopped: {stopped:?}\n{}", ns.log());
        assert_eq!(ns.exit_of(stopped[0]).as_deref(), Some("143"));
        assert_eq!(ns.action("sigterm", "ok").await, 1.0);
        // Which hogs were spared: the log and the breaker's alert name them.
        let spared: Vec<String> = hogs
            .iter()
            .filter(|h| ns.exit_of(h).is_none())
            .map(|h| std::fs::read_to_string(ns.path(&format!("{h}.pid"))).unwrap().trim().to_owned())
            .collect();
        // The breaker's critical alert names the hogs it spared in its round; a hog
        // spared in a later round (a busy host can part them by a round) gets its
        // own report: each is named in an alert that says "spared".
        let named = |pid: &String| {
            hook_alerts(&hook).iter().any(|a| {
                let details = a["details"].as_str().unwrap_or_default();
                (a["kind"] == "doctor_breaker" || a["kind"] == "doctor_report")
                    && details.contains(&format!("pid {pid} "))
                    && details.contains("spared")
            })
        };
        eventually(Duration::from_secs(10), "the spared hogs named in alerts", || async {
            spared.iter().all(named)
        })
        .await;
        assert!(hook_alerts(&hook).iter().any(|a| a["kind"] == "doctor_breaker"));
        let log = ns.stop();
        for pid in &spared {
            assert!(
                log.lines().any(|l| l.contains("doctor spared a hog") && l.contains(&format!("pid={pid}"))),
                "{pid} in the log: {log}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_execs_a_protected_name_is_never_signalled() {
    let _one = lock().await;
    within(60, async {
        // `early` burns as bash for 0.6 s (sampled as bash, above the line), then
        // execs the protected `busyguard` before sustain_ms: decided on what it is
        // when decided, it is protected. `late` is a hog as bash until SIGTERM, whose
        // trap then execs `busyguard` (burning on, ignoring nothing): the SIGKILL
        // after grace_ms must see that and not be sent.
        let early = "bash -c 'end=$((${EPOCHREALTIME/./}+600000)); \
                     while (( ${EPOCHREALTIME/./} < end )); do :; done; exec ./busyguard > /dev/null'";
        let late = "bash -c 'trap \"exec ./busyguard > /dev/null\" TERM; while :; do :; done'";
        let ns = Namespace::start(
            &[
                victim("early", Some(VICTIM_UID), early),
                victim("late", Some(VICTIM_UID), late),
            ],
            &doctor_toml("protected_names = [\"busyguard\"]\n"),
            "",
            "",
        );
        eventually(Duration::from_secs(15), "the SIGKILL withheld", || async {
            ns.action("sigkill", "changed").await >= 1.0
        })
        .await;
        assert_eq!(ns.exit_of("late"), None, "late was not killed: {}", ns.log());
        assert_eq!(ns.exit_of("early"), None, "early was not signalled: {}", ns.log());
        eventually(Duration::from_secs(10), "both reported protected", || async {
            ns.action("report", "protected").await >= 2.0
        })
        .await;
        // Only late's SIGTERM (it was a bash hog then); no SIGKILL at all.
        assert_eq!(ns.action("sigterm", "ok").await, 1.0);
        assert_eq!(ns.action("sigkill", "ok").await, 0.0);
        assert_eq!(ns.exit_of("late"), None);
        assert_eq!(ns.exit_of("early"), None);
        let log = ns.stop();
        assert!(log.contains("now comm busyguard"), "{log}");
    })
    .await;
}

/// A cgroup v2 directory under this test's own cgroup, removed on drop.
struct TestCgroup(PathBuf);

impl TestCgroup {
    /// `None` (with the reason) where cgroup v2 is not mounted or not writable.
    fn create(name: &str) -> Result<Self, String> {
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
        let mount = mountinfo
            .lines()
            .find(|l| {
                l.split(" - ")
                    .nth(1)
                    .is_some_and(|t| t.starts_with("cgroup2 "))
            })
            .and_then(|l| l.split_whitespace().nth(4))
            .ok_or("no cgroup2 mount")?
            .to_owned();
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("no cgroup v2 line in /proc/self/cgroup")?
            .trim_start_matches('/')
            .to_owned();
        let dir = PathBuf::from(mount).join(own).join(name);
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Empty once its processes are reaped (the namespace is gone by now).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.0).is_err() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hog_in_a_protected_unit_is_spared_whatever_its_name() {
    let _one = lock().await;
    within(60, async {
        let unit = format!("canarygate-test-{}.scope", std::process::id());
        let cgroup = match TestCgroup::create(&unit) {
            Ok(cgroup) => cgroup,
            Err(why) => {
                // docs/doctor.md says what this means for a host: units cannot be
                // matched where /proc/PID/cgroup has no such path.
                eprintln!("SKIPPED: cannot make a cgroup v2 here ({why})");
                return;
            }
        };
        // The protected hog joins the unit's cgroup (as root), then becomes the
        // victim user's plain `sh` burner: nothing in its name or user protects it.
        let join = format!(
            "sh -c 'echo $$ > {procs} && exec setpriv --reuid={VICTIM_UID} --regid={VICTIM_UID} \
             --clear-groups sh -c \"while :; do :; done\"'",
            procs = cgroup.0.join("cgroup.procs").display()
        );
        let ns = Namespace::start(
            &[
                victim("unit", None, &join),
                victim("control", Some(VICTIM_UID), BURN),
            ],
            &doctor_toml(&format!("protected_units = [\"{unit}\"]\n")),
            "",
            "",
        );
        // The same kind of hog outside the unit is stopped: the doctor was able to.
        assert_eq!(
            ns.wait_exit("control", Duration::from_secs(10)).await,
            "143"
        );
        eventually(
            Duration::from_secs(10),
            "the unit's hog reported",
            || async { ns.action("report", "protected").await >= 1.0 },
        )
        .await;
        assert_eq!(ns.exit_of("unit"), None);
        assert_eq!(ns.action("sigterm", "ok").await, 1.0);
        let pid = std::fs::read_to_string(ns.path("unit.pid")).unwrap();
        let cgroups = std::fs::read_to_string(cgroup.0.join("cgroup.procs")).unwrap_or_default();
        assert!(
            !cgroups.trim().is_empty(),
            "the hog is in the test's cgroup"
        );
        let log = ns.stop();
        assert!(
            log.lines()
                .any(|l| l.contains("doctor report") && l.contains(&format!("pid={}", pid.trim()))),
            "{log}"
        );
        drop(cgroup);
    })
    .await;
}

#[tokio::test]
async fn an_unresolvable_protected_user_is_a_config_error_naming_file_line_and_key() {
    within(30, async {
        let dir = TempDir::new("doctor-users");
        let config = dir.write(
            "c.toml",
            "[doctor]\nadmin_listen = \"127.0.0.1:0\"\nprotected_users = [\"root\", \"no-such-user-cg29\"]\n",
        );
        let mut doctor = Command::new(binary())
            .args(["doctor", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("stderr")).unwrap())
            .spawn()
            .unwrap();
        // It must refuse at once; one that runs is stopped (by its PID) and fails.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = doctor.try_wait().unwrap() {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = doctor.kill();
                let _ = doctor.wait();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let stderr = std::fs::read_to_string(dir.0.join("stderr")).unwrap_or_default();
        assert_eq!(status.and_then(|s| s.code()), Some(64), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "{}:3: key `doctor.protected_users[1]`: no user \"no-such-user-cg29\"",
                config.display()
            )),
            "{stderr}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_lines_in_the_kill_alert_are_cut_redacted_and_escaped() {
    let _one = lock().await;
    within(60, async {
        let hook = Peer::start(Mode::Created).await;
        // `yes` repeats its arguments: a hog whose command line holds a password, a
        // token, a newline that would forge a log line, and more than four arguments.
        let cmd = "yes -- -pS3CRET --api-token=T0KEN \"$(printf 'x\\nFORGED doctor acted')\" tail1 tail2 > /dev/null";
        let ns = Namespace::start(
            &[victim("talker", Some(VICTIM_UID), cmd)],
            &doctor_toml(&webhook_toml(&hook)),
            "",
            "",
        );
        assert_eq!(ns.wait_exit("talker", Duration::from_secs(10)).await, "143");
        eventually(Duration::from_secs(15), "the kill alert", || async {
            hook_alerts(&hook).iter().any(|a| a["kind"] == "doctor_kill")
        })
        .await;
        let alerts = hook_alerts(&hook);
        let kill = alerts.iter().find(|a| a["kind"] == "doctor_kill").unwrap();
        let details = kill["details"].as_str().unwrap_or_default();
        assert!(
            details.contains(
                "yes -- -p<redacted> --api-token=<redacted> x\\nFORGED doctor acted … (+2 more)"
            ),
            "{details}"
        );
        let log = ns.stop();
        for text in alerts.iter().map(ToString::to_string).chain([log.clone()]) {
            assert!(!text.contains("S3CRET") && !text.contains("T0KEN"), "{text}");
        }
        assert!(
            !log.lines().any(|l| l.starts_with("FORGED")),
            "a newline in an argument forged a log line: {log}"
        );
        assert!(log.contains("doctor acted"), "{log}");
    })
    .await;
}

//! `openuni serve` against the running program on 127.0.0.1 (an ephemeral port) with the built-in
//! tiny model, on the CPU and on the emulated GPU: images equal `openuni generate`'s, concurrent
//! requests share batches (seen in /metrics), overload gives 503 with Retry-After, a client that
//! disconnects is dropped before its batch, bad input gets OpenAI-shaped 4xx naming the field,
//! the API key, the deadline, and SIGTERM finishing the running request.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

/// A server process; killed when dropped (unless it was stopped).
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(cache: &Path, args: &[&str], envs: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_openuni"));
        cmd.args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(args);
        cmd.env("OPENUNI_CACHE", cache)
            .env("HF_HUB_CACHE", cache.join("no-hub"))
            .env_remove("OPENUNI_API_KEY");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let at = line
            .find("http://")
            .unwrap_or_else(|| panic!("no address in the server's first line: {line:?}"));
        let base = line[at..].trim().to_string();
        assert!(base.starts_with("http://127.0.0.1:"), "{base}");
        Server { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit; its exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the server did not stop within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response: status, Retry-After header, body as JSON (Null when not JSON).
struct Reply {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(timeout).build()
}

/// A response, or the transport error (a timeout, a refused connection) as text.
fn post(url: &str, body: &str, key: Option<&str>, timeout: Duration) -> Result<Reply, String> {
    let mut req = agent(timeout)
        .post(url)
        .set("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let r = match req.send_string(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(t)) => return Err(t.to_string()),
    };
    let (status, retry_after) = (r.status(), r.header("Retry-After").map(str::to_string));
    let text = r.into_string().unwrap();
    Ok(Reply {
        status,
        retry_after,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    })
}

fn generate_images(s: &Server, body: Value) -> Vec<Vec<u8>> {
    let r = post(
        &s.url("/v1/images/generations"),
        &body.to_string(),
        None,
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| decode_png(d["b64_json"].as_str().unwrap()))
        .collect()
}

fn decode_png(b64: &str) -> Vec<u8> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

fn get(url: &str) -> (u16, String) {
    match agent(Duration::from_secs(10)).get(url).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// The value of the metric line `name` (with its labels, if any) in /metrics.
fn metric(s: &Server, name: &str) -> f64 {
    let (_, text) = get(&s.url("/metrics"));
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

/// Waits (bounded) until `cond` holds.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `openuni generate` with `args`; the RGB bytes of the images it wrote, in order.
fn generate_cli(cache: &Path, out: &Path, args: &[&str]) -> Vec<Vec<u8>> {
    let o = Command::new(env!("CARGO_BIN_EXE_openuni"))
        .arg("generate")
        .args(args)
        .args(["--out", out.to_str().unwrap()])
        .env("OPENUNI_CACHE", cache)
        .env("HF_HUB_CACHE", cache.join("no-hub"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|p| openuni::image::read_png(Path::new(p)).unwrap().2)
        .collect()
}

/// One request of 1 image (when `single`) and one of 3 (a batch of 3) against `openuni generate`
/// with the same seeds and parameters (`--batch 3` for the batch): the same RGB bytes.
fn images_equal_generate(cache: &Path, s: &Server, device: &[&str], single: bool) {
    if single {
        single_image_equals_generate(cache, s, device);
    }
    batch_of_three_equals_generate(cache, s, device);
}

fn single_image_equals_generate(cache: &Path, s: &Server, device: &[&str]) {
    let one = generate_images(
        s,
        json!({"prompt": "a red bicycle", "size": "64x96", "seed": 5, "steps": 3, "guidance_scale": 3.0}),
    );
    let mut args = vec![
        "--prompt",
        "a red bicycle",
        "--width",
        "64",
        "--height",
        "96",
        "--seed",
        "5",
        "--steps",
        "3",
        "--guidance",
        "3",
    ];
    args.extend_from_slice(device);
    let reference = generate_cli(cache, &cache.join("g1"), &args);
    assert_eq!(one.len(), 1);
    assert!(
        one[0] == reference[0],
        "served image differs from `openuni generate`'s"
    );
}

fn batch_of_three_equals_generate(cache: &Path, s: &Server, device: &[&str]) {
    let three = generate_images(
        s,
        json!({"prompt": "a fox", "negative_prompt": "blurry", "n": 3, "size": "64x64", "seed": 11, "steps": 2}),
    );
    let prompts = cache.join("p.jsonl");
    std::fs::write(
        &prompts,
        (11..14)
            .map(|seed| format!("{{\"prompt\":\"a fox\",\"seed\":{seed}}}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let mut args = vec![
        "--prompts",
        prompts.to_str().unwrap(),
        "--negative-prompt",
        "blurry",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--batch",
        "3",
    ];
    args.extend_from_slice(device);
    let reference = generate_cli(cache, &cache.join("g3"), &args);
    assert_eq!(three.len(), 3);
    assert!(three[0] != three[1], "two seeds gave the same image");
    for (k, (a, b)) in three.iter().zip(&reference).enumerate() {
        assert!(
            a == b,
            "image {k} of the batch differs from `openuni generate --batch 3`'s"
        );
    }
}

/// `clients` concurrent requests of one batch key; all succeed, and /metrics shows a batch of
/// more than one image.
fn concurrent_requests_share_batches(s: &Server, clients: usize) {
    let batches_before = metric(s, "openuni_batch_size_count");
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let url = s.url("/v1/images/generations");
            std::thread::spawn(move || {
                // The shape of `batch_of_three_equals_generate`: resident executors are reused.
                let body = json!({"prompt": format!("prompt {i}"), "size": "64x64", "steps": 2, "seed": i}).to_string();
                post(&url, &body, None, Duration::from_secs(60)).unwrap()
            })
        })
        .collect();
    for t in threads {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["data"].as_array().unwrap().len(), 1);
    }
    let batches = metric(s, "openuni_batch_size_count") - batches_before;
    assert!(
        batches < clients as f64,
        "{clients} concurrent requests ran in {batches} batches: none was shared"
    );
    assert!(
        metric(s, "openuni_batch_size_bucket{le=\"1\"}") < metric(s, "openuni_batch_size_count"),
        "no batch held more than one image"
    );
    assert_eq!(metric(s, "openuni_queue_depth"), 0.0);
}

#[test]
fn cpu_images_equal_generate_and_concurrent_requests_share_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(
        tmp.path(),
        &["--max-batch", "4", "--batch-window-ms", "300"],
        &[],
    );
    let (code, models) = get(&s.url("/v1/models"));
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&models).unwrap()["data"][0]["id"],
        "openuni-tiny"
    );
    images_equal_generate(tmp.path(), &s, &[], true);
    concurrent_requests_share_batches(&s, 8);
}

#[test]
fn emulated_gpu_images_equal_generate_and_requests_share_batches() {
    if !openuni::exec::emulator_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dev = ["--device", "emu", "--dtype", "bf16"];
    let mut args = dev.to_vec();
    args.extend(["--max-batch", "4", "--batch-window-ms", "500"]);
    let s = Server::start(tmp.path(), &args, &[]);
    // The batch path only (the single image is the same code on a batch of one), and concurrent
    // requests of the same shape, so that the emulator's run time stays small.
    images_equal_generate(tmp.path(), &s, &dev, false);
    concurrent_requests_share_batches(&s, 3);
}

/// A long request A holds the worker (one image per batch, a queue of one): the next request B
/// waits in the queue, the one after is refused with 503 and Retry-After; B's client disconnects
/// and B is dropped before any batch (its image is never made); A's client then disconnects and
/// A's batch stops at its next step (A is far longer than the test waits, so no timing margin is
/// needed); SIGTERM lets a running request finish.
#[test]
fn overload_503_cancellation_and_graceful_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Server::start(
        tmp.path(),
        &["--max-batch", "1", "--queue", "1", "--batch-window-ms", "0"],
        &[],
    );
    let url = s.url("/v1/images/generations");
    // Many seconds on any CPU (the largest size and the most steps allowed): it ends when its
    // client leaves.
    let endless = json!({"prompt": "long", "size": "512x512", "steps": 1000}).to_string();
    let short = json!({"prompt": "short", "size": "64x64", "steps": 1}).to_string();
    // A's client: a raw connection, so the test decides when it leaves (by closing it).
    let a = {
        use std::io::Write;
        let mut conn = std::net::TcpStream::connect(s.base.trim_start_matches("http://")).unwrap();
        let head = format!("POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", endless.len());
        conn.write_all(head.as_bytes()).unwrap();
        conn.write_all(endless.as_bytes()).unwrap();
        conn
    };
    wait_for("the long request to start", || {
        metric(&s, "openuni_batches_running") == 1.0
    });
    // B waits in the queue and gives up after 0.6 s (its client disconnects).
    let b = {
        let (url, short) = (url.clone(), short.clone());
        std::thread::spawn(move || post(&url, &short, None, Duration::from_millis(600)))
    };
    wait_for("the second request to be queued", || {
        metric(&s, "openuni_queue_depth") == 1.0
    });
    let c = post(&url, &short, None, Duration::from_secs(10)).unwrap();
    assert_eq!(c.status, 503, "{}", c.body);
    assert_eq!(c.body["error"]["code"], "queue_full");
    let secs: u64 = c.retry_after.expect("Retry-After header").parse().unwrap();
    assert!((1..=60).contains(&secs));
    assert!(
        b.join().unwrap().is_err(),
        "the client with a 0.6 s timeout got an answer"
    );
    wait_for("the disconnect to be seen", || {
        metric(&s, "openuni_errors_total{kind=\"cancelled\"}") == 1.0
    });
    assert_eq!(
        metric(&s, "openuni_batches_running"),
        1.0,
        "the long request ended before its client left"
    );
    // The cancelled request holds no place: D is admitted while A runs.
    let d = {
        let (url, short) = (url.clone(), short.clone());
        std::thread::spawn(move || post(&url, &short, None, Duration::from_secs(60)).unwrap())
    };
    wait_for("D to be queued", || {
        metric(&s, "openuni_queue_depth") == 1.0
    });
    assert_eq!(metric(&s, "openuni_images_generated_total"), 0.0);
    assert_eq!(metric(&s, "openuni_batches_stopped_total"), 0.0);
    // A's client leaves: A's batch stops at its next step and D runs.
    drop(a);
    wait_for("the deserted batch to stop", || {
        metric(&s, "openuni_batches_stopped_total") == 1.0
    });
    assert_eq!(d.join().unwrap().status, 200);
    // Only D's image was made: B never ran, A stopped.
    assert_eq!(metric(&s, "openuni_images_generated_total"), 1.0);
    assert_eq!(metric(&s, "openuni_batch_size_count"), 1.0);
    assert_eq!(metric(&s, "openuni_errors_total{kind=\"queue_full\"}"), 1.0);

    // SIGTERM while a request runs: it still gets its image, then the process exits cleanly.
    let medium = json!({"prompt": "medium", "size": "256x256", "steps": 500}).to_string();
    let e = std::thread::spawn(move || post(&url, &medium, None, Duration::from_secs(60)).unwrap());
    wait_for("the last request to start", || {
        metric(&s, "openuni_batches_running") == 1.0
    });
    let status = s.terminate();
    let e = e.join().unwrap();
    assert_eq!(e.status, 200, "{}", e.body);
    assert!(status.success(), "{status}");
}

/// Two requests share one batch; the first one's client leaves while it runs: its rows leave the
/// batch at the next step (counted in `openuni_rows_cancelled_total`), and the other request's
/// image is byte for byte the one `openuni generate --batch 2` makes for the same two prompts and
/// seeds (what the batch would have given it had nobody left).
#[test]
fn cpu_cancelled_request_leaves_its_running_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(
        tmp.path(),
        &["--max-batch", "2", "--batch-window-ms", "5000"],
        &[],
    );
    let url = s.url("/v1/images/generations");
    // About a second or more of denoising on the CPU: long enough to leave in the middle.
    let (size, steps) = ("128x128", 1000);
    let leaving = json!({"prompt": "a kite", "size": size, "seed": 3, "steps": steps}).to_string();
    let staying = json!({"prompt": "a boat", "size": size, "seed": 9, "steps": steps}).to_string();
    let a = {
        use std::io::Write;
        let mut conn = std::net::TcpStream::connect(s.base.trim_start_matches("http://")).unwrap();
        let head = format!("POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", leaving.len());
        conn.write_all(head.as_bytes()).unwrap();
        conn.write_all(leaving.as_bytes()).unwrap();
        conn
    };
    wait_for("the first request to be queued", || {
        metric(&s, "openuni_queue_depth") == 1.0
    });
    let b =
        std::thread::spawn(move || post(&url, &staying, None, Duration::from_secs(120)).unwrap());
    wait_for("the batch of two to start", || {
        metric(&s, "openuni_batches_running") == 1.0
    });
    drop(a);
    let b = b.join().unwrap();
    assert_eq!(b.status, 200, "{}", b.body);
    assert_eq!(
        metric(&s, "openuni_rows_cancelled_total"),
        1.0,
        "the cancelled request's row did not leave the running batch"
    );
    assert_eq!(metric(&s, "openuni_images_generated_total"), 1.0);
    assert_eq!(
        metric(&s, "openuni_batch_size_sum"),
        2.0,
        "the two requests did not share a batch"
    );
    assert_eq!(metric(&s, "openuni_batches_stopped_total"), 0.0);
    let served = decode_png(b.body["data"][0]["b64_json"].as_str().unwrap());
    let prompts = tmp.path().join("two.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\":\"a kite\",\"seed\":3}\n{\"prompt\":\"a boat\",\"seed\":9}\n",
    )
    .unwrap();
    let steps = steps.to_string();
    let reference = generate_cli(
        tmp.path(),
        &tmp.path().join("g2"),
        &[
            "--prompts",
            prompts.to_str().unwrap(),
            "--width",
            "128",
            "--height",
            "128",
            "--steps",
            &steps,
            "--batch",
            "2",
        ],
    );
    assert!(
        served == reference[1],
        "the image of the request that stayed differs from `openuni generate --batch 2`'s"
    );
}

/// Bad JSON, bad fields, a too-large body, an unknown path: OpenAI-shaped errors naming the field;
/// the API key (from OPENUNI_API_KEY) on /v1/*; the per-request deadline. The server stays up.
#[test]
fn bad_requests_api_key_and_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(
        tmp.path(),
        &[
            "--max-body-bytes",
            "2048",
            "--deadline-s",
            "1",
            "--max-batch",
            "4",
        ],
        &[("OPENUNI_API_KEY", "sk-test-key")],
    );
    let url = s.url("/v1/images/generations");
    let key = Some("sk-test-key");
    let send =
        |body: &str, key: Option<&str>| post(&url, body, key, Duration::from_secs(30)).unwrap();

    for wrong in [
        None,
        Some("sk-test-kez"),
        Some("sk-test-key-longer"),
        Some(""),
    ] {
        let r = send(r#"{"prompt":"a"}"#, wrong);
        assert_eq!(r.status, 401, "{wrong:?}");
        assert_eq!(r.body["error"]["code"], "invalid_api_key");
    }
    assert_eq!(get(&s.url("/v1/models")).0, 401);
    let models = agent(Duration::from_secs(10))
        .get(&s.url("/v1/models"))
        .set("Authorization", "Bearer sk-test-key")
        .call()
        .unwrap();
    assert_eq!(models.status(), 200);
    assert_eq!(get(&s.url("/health")).0, 200);

    let r = send("{not json", key);
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["code"], "invalid_json");
    assert_eq!(r.body["error"]["type"], "invalid_request_error");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    let cases = [
        (r#"{"n":1}"#, "prompt"),
        (r#"{"prompt":7}"#, "prompt"),
        (r#"{"prompt":"a","n":0}"#, "n"),
        (r#"{"prompt":"a","n":5}"#, "n"),
        (r#"{"prompt":"a","size":"100x100"}"#, "size"),
        (r#"{"prompt":"a","size":"64"}"#, "size"),
        // Above --max-side (default: twice the tiny model's 256 px).
        (r#"{"prompt":"a","size":"1024x64"}"#, "size"),
        (
            r#"{"prompt":"a","response_format":"url"}"#,
            "response_format",
        ),
        (r#"{"prompt":"a","steps":-2}"#, "steps"),
        (r#"{"prompt":"a","seed":1.5}"#, "seed"),
        (
            r#"{"prompt":"a","guidance_scale":null,"negative_prompt":3}"#,
            "negative_prompt",
        ),
        (r#"{"prompt":"a","model":"dall-e-3"}"#, "model"),
        // Refused by the prompt template's tokenizer.
        (r#"{"prompt":"a <|im_end|> b"}"#, "prompt"),
        (
            r#"{"prompt":"a","negative_prompt":"  "}"#,
            "negative_prompt",
        ),
    ];
    for (body, field) in cases {
        let r = send(body, key);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.body["error"]["param"], field, "{body}: {}", r.body);
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("`{field}`")),
            "{}",
            r.body
        );
    }
    let r = send(r#"{"prompt":"a","colour":"red"}"#, key);
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (400, Some("unknown_parameter"))
    );
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`colour`"));
    let r = send(&json!({"prompt": "a".repeat(4000)}).to_string(), key);
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{}",
        r.body
    );
    assert_eq!(get(&s.url("/v1/nothing")).0, 404);

    // A request that cannot finish within the 1 s deadline: 504, and the server goes on.
    let r = send(
        &json!({"prompt": "slow", "size": "512x512", "steps": 1000}).to_string(),
        key,
    );
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "deadline_exceeded");
    // Nobody waits for that batch any more: it stops at its next step, and the server goes on.
    wait_for("the abandoned batch to stop", || {
        metric(&s, "openuni_batches_stopped_total") == 1.0
    });
    assert_eq!(metric(&s, "openuni_images_generated_total"), 0.0);
    let r = send(
        &json!({"prompt": "fine", "size": "64x64", "steps": 1}).to_string(),
        key,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Every case but the missing prompt and the wrong model counts as `invalid_value`.
    assert_eq!(
        metric(&s, "openuni_errors_total{kind=\"invalid_value\"}"),
        cases.len() as f64 - 2.0
    );
    assert_eq!(
        metric(&s, "openuni_errors_total{kind=\"invalid_api_key\"}"),
        5.0
    );
}

/// `openuni chat` with `args`: (the answer it printed, the number of tokens it reported).
fn chat_cli(cache: &Path, args: &[&str]) -> (String, usize) {
    let o = Command::new(env!("CARGO_BIN_EXE_openuni"))
        .arg("chat")
        .args(args)
        .env("OPENUNI_CACHE", cache)
        .env("HF_HUB_CACHE", cache.join("no-hub"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    let answer = String::from_utf8(o.stdout)
        .unwrap()
        .strip_suffix('\n')
        .expect("a newline after the answer")
        .to_string();
    let at = err
        .find(" tokens, stopped")
        .unwrap_or_else(|| panic!("no token count in {err}"));
    let tokens = err[..at].rsplit('(').next().unwrap().parse().unwrap();
    (answer, tokens)
}

/// A streamed chat answer: its `chat.completion.chunk` objects, checked to end with `[DONE]`.
fn chat_stream(url: &str, body: &Value) -> Vec<Value> {
    let r = agent(Duration::from_secs(60))
        .post(url)
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.header("Content-Type"), Some("text/event-stream"));
    let text = r.into_string().unwrap();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .collect()
}

/// A small PNG (an RGB gradient), as a file and as a data URL.
fn test_image(dir: &Path) -> (std::path::PathBuf, String) {
    let (w, h) = (40, 28);
    let rgb: Vec<u8> = (0..h)
        .flat_map(|y| (0..w).flat_map(move |x| [(x * 6) as u8, (y * 9) as u8, ((x + y) * 3) as u8]))
        .collect();
    let png = {
        let mut out = vec![];
        let mut e = png::Encoder::new(&mut out, w as u32, h as u32);
        e.set_color(png::ColorType::Rgb);
        e.set_depth(png::BitDepth::Eight);
        e.write_header().unwrap().write_image_data(&rgb).unwrap();
        out
    };
    let path = dir.join("picture.png");
    std::fs::write(&path, &png).unwrap();
    (
        path,
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&png)
        ),
    )
}

/// Chat on the CPU (the built-in tiny chat model): a question about an image, greedy and sampled
/// with a seed, answered as one `chat.completion` and as streamed chunks, gives the text and the
/// token count `openuni chat` gives for the same question, image and seed.
#[test]
fn cpu_chat_equals_openuni_chat_streaming_or_not() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[], &[]);
    let url = s.url("/v1/chat/completions");
    let (models_code, models) = get(&s.url("/v1/models"));
    assert_eq!(models_code, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&models).unwrap()["data"][1]["id"],
        "openuni-tiny-chat"
    );
    let (image, data_url) = test_image(tmp.path());
    let question = "What is in this picture?";
    let content = json!([{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": question}]);
    for (extra, cli) in [
        (json!({}), vec![]),
        (
            json!({"temperature": 0.9, "top_p": 0.95, "seed": 7}),
            vec!["--temperature", "0.9", "--top-p", "0.95", "--seed", "7"],
        ),
    ] {
        let mut body = json!({"model": "openuni-tiny-chat", "messages": [{"role": "user", "content": content}], "max_tokens": 10});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let mut args = vec![
            "--prompt",
            question,
            "--image",
            image.to_str().unwrap(),
            "--max-new-tokens",
            "10",
        ];
        args.extend(cli);
        let (answer, tokens) = chat_cli(tmp.path(), &args);

        let r = post(&url, &body.to_string(), None, Duration::from_secs(60)).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["object"], "chat.completion");
        assert_eq!(r.body["choices"][0]["message"]["role"], "assistant");
        assert_eq!(
            r.body["choices"][0]["message"]["content"],
            answer.as_str(),
            "{body}"
        );
        assert_eq!(r.body["usage"]["completion_tokens"], tokens);
        let prompt_tokens = r.body["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(
            prompt_tokens > 256,
            "the image's 256 context tokens are not in the prompt ({prompt_tokens})"
        );
        assert_eq!(
            r.body["usage"]["total_tokens"],
            prompt_tokens + tokens as u64
        );
        let finish = if tokens < 10 { "stop" } else { "length" };
        assert_eq!(r.body["choices"][0]["finish_reason"], finish);

        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let chunks = chat_stream(&url, &body);
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(streamed, answer);
        let n = chunks.len();
        assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], finish);
        assert_eq!(chunks[n - 1]["usage"]["completion_tokens"], tokens);
        assert_eq!(chunks[n - 1]["usage"]["prompt_tokens"], prompt_tokens);
    }
    // History and a text-only question: the same as `openuni chat --history`.
    let history = tmp.path().join("history.json");
    std::fs::write(&history, r#"[["Hi", "Hello! How can I help?"]]"#).unwrap();
    let (answer, _) = chat_cli(
        tmp.path(),
        &[
            "--prompt",
            "Tell me more",
            "--history",
            history.to_str().unwrap(),
            "--max-new-tokens",
            "6",
        ],
    );
    let body = json!({"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Hello! How can I help?"}]},
        {"role": "user", "content": "Tell me more"}], "max_tokens": 6});
    let r = post(&url, &body.to_string(), None, Duration::from_secs(60)).unwrap();
    assert_eq!(
        r.body["choices"][0]["message"]["content"],
        answer.as_str(),
        "{}",
        r.body
    );
    assert_eq!(metric(&s, "openuni_chat_requests_total"), 5.0);
}

/// Bad chat requests: OpenAI-shaped 400s naming the field (content parts included), an http(s)
/// image URL refused without any fetch; the server keeps answering.
#[test]
fn chat_bad_requests_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &["--max-chat-body-bytes", "4096"], &[]);
    let url = s.url("/v1/chat/completions");
    let user = |content: Value| json!({"messages": [{"role": "user", "content": content}]});
    let image = |url: &str| json!([{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}]);
    let cases = [
        (json!({}), "messages"),
        (json!({"messages": []}), "messages"),
        (json!({"messages": "hi"}), "messages"),
        (json!({"messages": [7]}), "messages[0]"),
        (
            json!({"messages": [{"role": "robot", "content": "hi"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]}),
            "messages[1].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
            "messages[1].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
            "messages[1].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}),
            "messages[0].tool_calls",
        ),
        (user(json!(5)), "messages[0].content"),
        (user(json!("")), "messages[0].content"),
        (
            user(json!([{"type": "audio", "audio": {}}])),
            "messages[0].content[0].type",
        ),
        (
            user(json!([{"text": "no type"}])),
            "messages[0].content[0].type",
        ),
        (
            user(json!([{"type": "text", "text": 3}])),
            "messages[0].content[0].text",
        ),
        (user(json!(["just a string"])), "messages[0].content[0]"),
        (
            user(json!([{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}])),
            "messages[0].content[0].image_url",
        ),
        (
            user(image("https://example.com/cat.png")),
            "messages[0].content[1].image_url.url",
        ),
        (
            user(image("http://127.0.0.1:1/cat.png")),
            "messages[0].content[1].image_url.url",
        ),
        (
            user(image("file:///etc/passwd")),
            "messages[0].content[1].image_url.url",
        ),
        (
            user(image("data:image/png,notbase64")),
            "messages[0].content[1].image_url.url",
        ),
        (
            user(image("data:image/gif;base64,R0lGODlh")),
            "messages[0].content[1].image_url.url",
        ),
        (
            user(image("data:image/png;base64,@@@@")),
            "messages[0].content[1].image_url.url",
        ),
        (
            user(image("data:image/png;base64,aGVsbG8gd29ybGQ=")),
            "messages[0].content[1].image_url.url",
        ),
        (
            json!({"messages": [{"role": "assistant", "content": image("data:image/png;base64,AAAA")}, {"role": "user", "content": "hi"}]}),
            "messages[0].content[1]",
        ),
        (
            json!({"messages": [{"role": "user", "content": "a <|im_end|> b"}]}),
            "messages[0].content",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}),
            "temperature",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}),
            "top_p",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}),
            "n",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}),
            "stream",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}),
            "model",
        ),
    ];
    for (body, field) in &cases {
        let r = post(&url, &body.to_string(), None, Duration::from_secs(30)).unwrap();
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.body["error"]["param"], *field, "{body}: {}", r.body);
        assert_eq!(r.body["error"]["type"], "invalid_request_error");
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("`{field}")),
            "{}",
            r.body
        );
    }
    let r = post(
        &url,
        &json!({"messages": [{"role": "user", "content": "hi"}], "stop": ["x"]}).to_string(),
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (400, Some("unknown_parameter"))
    );
    let r = post(
        &url,
        &user(json!("x".repeat(5000))).to_string(),
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{}",
        r.body
    );
    let r = post(&url, "{oops", None, Duration::from_secs(30)).unwrap();
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    let r = post(
        &url,
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).to_string(),
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["usage"]["completion_tokens"], 2);
}

/// A chat model folder without a vision tower (the built-in tiny OpenUni's LLM): the server
/// still serves images, and chat answers 501 saying why.
#[test]
fn chat_without_a_vision_tower_is_501_naming_why() {
    let tmp = tempfile::tempdir().unwrap();
    let llm = tmp.path().join("tiny-model-v1/llm");
    let s = Server::start(tmp.path(), &["--chat-model", llm.to_str().unwrap()], &[]);
    let r = post(
        &s.url("/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": "hi"}]}).to_string(),
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(r.status, 501, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "chat_unavailable");
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("tiny-model-v1/llm") && msg.contains("vision"),
        "{msg}"
    );
    let (_, models) = get(&s.url("/v1/models"));
    assert_eq!(
        serde_json::from_str::<Value>(&models).unwrap()["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        generate_images(
            &s,
            json!({"prompt": "still works", "size": "64x64", "steps": 1})
        )
        .len(),
        1
    );
}

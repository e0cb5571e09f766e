//! `openuni chat --questions FILE.jsonl --answers OUT.jsonl`: many questions answered with
//! continuous batching over the decoder's batch slots on the chosen device ([`super::generate_continuous`]).
//!
//! Questions: one JSON object per line, `{"id": string | number, "question": string,
//! "image": path | [paths] | absent}` (other fields are ignored; blank lines skipped); relative
//! image paths resolve against the questions file's folder. Every line is checked before any
//! work, and bad lines are reported with their line numbers.
//!
//! Answers: one JSON object per line, `{"id", "question", "answer", "tokens"}`, appended as each
//! sequence finishes, each a complete line written with one `write_all` and flushed, so an
//! interrupted run leaves whole lines plus at most one partial last line. A re-run skips the ids
//! already answered; a partial last line (no newline) is cut off and its question redone.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{generate_continuous, load_images, BatchRequest, ChatModel, ChatOptions};

/// One question of the file.
#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    /// 1-based line number in the questions file.
    pub line: usize,
    pub id: Value,
    pub question: String,
    /// Image files, resolved against the questions file's folder.
    pub images: Vec<PathBuf>,
}

/// The id's canonical JSON text (1 and "1" are different ids).
fn id_key(id: &Value) -> String {
    id.to_string()
}

fn parse_question(
    line: &str,
    base: &Path,
) -> std::result::Result<(Value, String, Vec<PathBuf>), String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let id = match obj.get("id") {
        Some(id @ (Value::String(_) | Value::Number(_))) => id.clone(),
        Some(other) => return Err(format!("`id` is {other}, expected a string or a number")),
        None => return Err("no `id`".into()),
    };
    let question = match obj.get("question") {
        Some(Value::String(q)) if !q.trim().is_empty() => q.clone(),
        Some(Value::String(_)) => return Err("`question` is empty".into()),
        Some(other) => return Err(format!("`question` is {other}, expected a string")),
        None => return Err("no `question`".into()),
    };
    let path = |p: &Value| match p {
        Value::String(s) if !s.is_empty() => Ok(base.join(s)),
        other => Err(format!("`image` holds {other}, expected a file path")),
    };
    let images = match obj.get("image") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a.iter().map(path).collect::<std::result::Result<_, _>>()?,
        Some(p) => vec![path(p)?],
    };
    Ok((id, question, images))
}

/// Reads and checks the whole questions file: every bad line is reported (line number and what
/// is wrong), as are duplicate ids.
pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the questions", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = vec![];
    let mut bad = vec![];
    let mut seen = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        match parse_question(line, base) {
            Ok((id, question, images)) => {
                if let Some(first) = seen.insert(id_key(&id), n) {
                    bad.push(format!(
                        "line {n}: id {id} was already used on line {first}"
                    ));
                }
                out.push(Question {
                    line: n,
                    id,
                    question,
                    images,
                });
            }
            Err(e) => bad.push(format!("line {n}: {e}")),
        }
    }
    if !bad.is_empty() {
        let shown = bad
            .iter()
            .take(20)
            .map(|b| format!("\n  {b}"))
            .collect::<String>();
        let more = if bad.len() > 20 {
            format!("\n  ... and {} more", bad.len() - 20)
        } else {
            String::new()
        };
        bail!(
            "{}: {} bad line(s) (expected {{\"id\": string | number, \"question\": string, \"image\": path | [paths] | absent}}):{shown}{more}",
            path.display(),
            bad.len()
        );
    }
    Ok(out)
}

/// The ids already in an answers file. A partial last line (an interrupted write: no newline)
/// is cut off so its question is redone; a complete line that is not an answer is an error.
pub fn answered_ids(path: &Path) -> Result<HashSet<String>> {
    let mut ids = HashSet::new();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ids),
        Err(e) => {
            return Err(e).with_context(|| format!("{}: cannot read the answers", path.display()))
        }
    };
    let mut start = 0;
    let mut n = 0;
    while start < bytes.len() {
        n += 1;
        let Some(len) = bytes[start..].iter().position(|&b| b == b'\n') else {
            eprintln!("note: {}: line {n} is incomplete (an interrupted run): it is removed and its question redone", path.display());
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("{}: cannot open", path.display()))?;
            f.set_len(start as u64)
                .with_context(|| format!("{}: cannot cut the incomplete line", path.display()))?;
            break;
        };
        let line = &bytes[start..start + len];
        start += len + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let id = serde_json::from_slice::<Value>(line)
            .ok()
            .and_then(|v| v.get("id").cloned());
        match id {
            Some(id) => ids.insert(id_key(&id)),
            None => bail!(
                "{}: line {n} is not an answer (a JSON object with an `id`); fix or remove it",
                path.display()
            ),
        };
    }
    Ok(ids)
}

/// Answers the questions not yet answered; returns (answered now, skipped as already answered).
pub fn run(
    o: &ChatOptions,
    questions: &Path,
    answers: &Path,
    max_batch: usize,
) -> Result<(usize, usize)> {
    let all = read_questions(questions)?;
    let done = answered_ids(answers)?;
    let todo: Vec<&Question> = all
        .iter()
        .filter(|q| !done.contains(&id_key(&q.id)))
        .collect();
    let skipped = all.len() - todo.len();
    let m = ChatModel::open(o.model.as_deref(), o.device, o.dtype)?;
    for q in &todo {
        m.check_text(
            &format!("{}: line {}: the question", questions.display(), q.line),
            &q.question,
        )?;
    }
    let mut llm = m.llm(max_batch.max(1))?;
    let embeddings = llm.embeddings();
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(answers)
        .with_context(|| {
            format!(
                "{}: cannot open the answers for appending",
                answers.display()
            )
        })?;
    let name = questions.display().to_string();
    let requests = todo
        .iter()
        .enumerate()
        .map(|(k, q)| -> Result<BatchRequest<usize>> {
            let at = |e: anyhow::Error| e.context(format!("{name}: line {} (id {})", q.line, q.id));
            let images = load_images(&q.images, o.max_num).map_err(at)?;
            let embeds = m
                .prompt_embeds(
                    &embeddings,
                    &[],
                    &q.question,
                    images
                        .as_ref()
                        .map(|t| (&t.pixel_values, t.tiles.as_slice())),
                    &name,
                )
                .map_err(at)?;
            Ok(BatchRequest {
                key: k,
                prompt_embeds: embeds,
                max_new_tokens: o.max_new_tokens,
            })
        });
    let mut answered = 0;
    anyhow::ensure!(max_batch >= 1, "the batch size must be at least 1");
    generate_continuous(&mut llm, requests, Some(m.eos), o.sampling, |k, ids| {
        let q = todo[k];
        let line = serde_json::json!({"id": q.id, "question": q.question, "answer": m.detokenise(&ids)?, "tokens": ids.len()});
        // One complete line per write, flushed: an interruption leaves at most one partial line.
        out.write_all(format!("{line}\n").as_bytes())
            .and_then(|()| out.flush())
            .with_context(|| format!("{}: cannot append", answers.display()))?;
        answered += 1;
        Ok(())
    })?;
    println!(
        "answered {answered} question(s) -> {} ({skipped} already answered there were skipped)",
        answers.display()
    );
    m.note_if_tiny();
    Ok((answered, skipped))
}

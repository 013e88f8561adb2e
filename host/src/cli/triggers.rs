//! `fmhost schedules list` and `fmhost cursors show|set`: what the journal knows of a
//! served pipeline's schedules and poll cursors, readable (and a cursor settable) while
//! `fmhost serve` runs on the same state directory.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde_json::{Value, json};

use super::{EXIT_FAILED, EXIT_INVALID};
use crate::journal::{Journal, Record, rfc3339, unix_ms};
use crate::pipeline::TriggerKind;
use crate::pipeline::triggers::{Trigger, of_file};

#[derive(Subcommand)]
pub enum SchedulesCommand {
    /// Every schedule of the pipelines in DIR: its next fire times, its last fire and
    /// how many fires were skipped (overlap) or missed (server down).
    List {
        /// Directory of `.pipeline.json` files (as given to `fmhost serve`).
        #[arg(long, value_name = "DIR", default_value = "pipelines")]
        pipelines: PathBuf,
        /// How many upcoming fires to show per schedule.
        #[arg(long, default_value_t = 1)]
        next: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum CursorsCommand {
    /// A poll trigger's cursor: the one its last succeeded run committed, or one set.
    Show {
        pipeline: String,
        /// The poll trigger's name (its `name`, else `poll`).
        #[arg(long, default_value = "poll")]
        trigger: String,
        #[arg(long)]
        json: bool,
    },
    /// Rewinds (or moves) a poll trigger's cursor: the next poll starts from VALUE
    /// (JSON, else taken as a string). A run under way when it is set does not move it.
    Set {
        pipeline: String,
        value: String,
        #[arg(long, default_value = "poll")]
        trigger: String,
    },
}

/// The schedules of every pipeline file in `dir`.
fn schedules_in(dir: &Path) -> Result<Vec<(String, Trigger)>, Vec<String>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| vec![format!("pipelines directory {}: {e}", dir.display())])?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter(|p| !p.to_string_lossy().ends_with(".test.json"))
        .collect();
    files.sort();
    let (mut out, mut problems) = (Vec::new(), Vec::new());
    for f in files {
        match of_file(&f) {
            Ok((name, triggers)) => out.extend(
                triggers
                    .into_iter()
                    .filter(|t| matches!(t.kind, TriggerKind::Schedule(_)))
                    .map(|t| (name.clone(), t)),
            ),
            Err(p) => problems.extend(p),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

pub async fn schedules(state: &Path, cmd: SchedulesCommand) -> u8 {
    let SchedulesCommand::List {
        pipelines,
        next,
        json,
    } = cmd;
    let list = match schedules_in(&pipelines) {
        Ok(l) => l,
        Err(problems) => {
            for p in problems {
                eprintln!("error: {p}");
            }
            return EXIT_INVALID;
        }
    };
    // No journal yet: nothing has fired.
    let journal = crate::journal::readable(state)
        .then(|| Journal::open_for_reading(state).ok())
        .flatten();
    let now = unix_ms(std::time::SystemTime::now());
    let mut rows = Vec::new();
    for (pipeline, t) in &list {
        let TriggerKind::Schedule(s) = &t.kind else {
            continue;
        };
        let record = match &journal {
            Some(j) => match j.trigger_record(pipeline, &t.name).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return EXIT_FAILED;
                }
            },
            None => Default::default(),
        };
        let mut upcoming = Vec::new();
        let mut at = now;
        while upcoming.len() < next.max(1) {
            match s.next_after(at) {
                Some(n) => {
                    upcoming.push(rfc3339(n));
                    at = n;
                }
                None => break,
            }
        }
        rows.push(json!({
            "pipeline": pipeline,
            "trigger": t.name,
            "cron": s.cron_text,
            "timezone": s.timezone.name(),
            "next_fire_at": upcoming,
            "last_fire_at": record.last_fire_ms.map(rfc3339),
            "skipped": record.skipped,
            "missed": record.missed,
        }));
    }
    if json {
        super::journal::print_json(&rows);
        return 0;
    }
    if rows.is_empty() {
        println!("no schedules in {}", pipelines.display());
        return 0;
    }
    println!(
        "{:<24} {:<12} {:<16} {:<16} {:<22} {:<22} {:>7} {:>6}",
        "PIPELINE", "TRIGGER", "CRON", "TIMEZONE", "NEXT FIRE", "LAST FIRE", "SKIPPED", "MISSED"
    );
    for r in rows {
        let upcoming: Vec<&str> = r["next_fire_at"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "{:<24} {:<12} {:<16} {:<16} {:<22} {:<22} {:>7} {:>6}",
            r["pipeline"].as_str().unwrap_or(""),
            r["trigger"].as_str().unwrap_or(""),
            r["cron"].as_str().unwrap_or(""),
            r["timezone"].as_str().unwrap_or(""),
            upcoming.first().copied().unwrap_or("never"),
            r["last_fire_at"].as_str().unwrap_or("-"),
            r["skipped"],
            r["missed"],
        );
        for later in upcoming.iter().skip(1) {
            println!("{:<24} {:<12} {:<16} {:<16} {later}", "", "", "", "");
        }
    }
    0
}

pub async fn cursors(state: &Path, cmd: CursorsCommand) -> u8 {
    let write = matches!(cmd, CursorsCommand::Set { .. });
    let journal = match super::journal::open(state, write).await {
        Ok(j) => j,
        Err(code) => return code,
    };
    match cmd {
        CursorsCommand::Show {
            pipeline,
            trigger,
            json,
        } => {
            let record = match journal.trigger_record(&pipeline, &trigger).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return EXIT_FAILED;
                }
            };
            if json {
                super::journal::print_json(&json!({
                    "pipeline": pipeline,
                    "trigger": trigger,
                    "cursor": record.cursor,
                    "updated_at": record.cursor_updated_ms.map(rfc3339),
                }));
                return 0;
            }
            match (record.cursor, record.cursor_updated_ms) {
                (Some(c), Some(at)) => println!("{c}  (since {})", rfc3339(at)),
                _ => println!(
                    "no cursor committed for {pipeline} trigger {trigger}: its next poll starts from the trigger's `initial`"
                ),
            }
            0
        }
        CursorsCommand::Set {
            pipeline,
            value,
            trigger,
        } => {
            let value: Value = serde_json::from_str(&value).unwrap_or(Value::String(value));
            let record = Record::SetCursor {
                pipeline: pipeline.clone(),
                trigger: trigger.clone(),
                value: value.clone(),
            };
            match journal.record_durably(record).await {
                Ok(_) => {
                    println!(
                        "cursor of {pipeline} trigger {trigger} set to {value}; the next poll starts from it"
                    );
                    0
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    EXIT_FAILED
                }
            }
        }
    }
}

//! Runs known to this server: live status while they run, the report once they end.
//! In memory, bounded; the durable journal is a separate concern.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::{Value, json};

use crate::engine::{RunObserver, RunReport, StageReport};

const KEEP: usize = 10_000;

#[derive(Default)]
pub struct RunStore {
    inner: Mutex<(HashMap<String, Value>, VecDeque<String>)>,
}

impl RunStore {
    pub fn get(&self, id: &str) -> Option<Value> {
        self.inner.lock().expect("runs lock").0.get(id).cloned()
    }

    pub fn finish(&self, report: &RunReport) {
        let value = serde_json::to_value(report).unwrap_or(Value::Null);
        self.put(&report.run_id, value);
    }

    fn put(&self, id: &str, value: Value) {
        let mut guard = self.inner.lock().expect("runs lock");
        let (map, order) = &mut *guard;
        if map.insert(id.to_string(), value).is_none() {
            order.push_back(id.to_string());
            while order.len() > KEEP {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
    }
}

impl RunObserver for RunStore {
    fn run_started(&self, run_id: &str, pipeline: &str, stages: &[StageReport]) {
        let started_at =
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        self.put(run_id, json!({"run_id": run_id, "pipeline": pipeline, "status": "running", "started_at": started_at, "stages": stages}));
    }

    fn stage_updated(&self, run_id: &str, stage: &StageReport) {
        let mut guard = self.inner.lock().expect("runs lock");
        if let Some(Value::Array(stages)) =
            guard.0.get_mut(run_id).and_then(|r| r.get_mut("stages"))
        {
            if let Some(slot) = stages.iter_mut().find(|s| s["id"] == stage.id.as_str()) {
                *slot = serde_json::to_value(stage).unwrap_or(Value::Null);
            }
        }
    }
}

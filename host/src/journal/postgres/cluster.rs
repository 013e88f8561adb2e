//! What the workers of a cluster share through a PostgreSQL journal: leases on runs,
//! each compared and set in one statement, services' rate limits (a GCRA kept in a row
//! and read on the database's clock, so workers' clocks need not agree), and advisory
//! locks for "one server per journal" and "one leader per cluster".

use super::{Delivery, JournalError, PgBackend, delivery_row, in_own_thread};
use crate::journal::{ClusterBackend, PluginEvent, unix_ms};

/// The advisory lock a server outside a cluster holds for as long as it runs.
const SERVER_LOCK: i64 = 0x666d_686f_7374_0002;
/// The advisory lock the cluster's leader holds: it fires schedules, polls cursors and
/// puts runs whose worker died back in the queue.
const LEADER_LOCK: i64 = 0x666d_686f_7374_0003;

impl ClusterBackend for PgBackend {
    fn claim(&mut self, run_id: &str, worker: &str, until: i64) -> Result<bool, JournalError> {
        self.call(async |client, _| {
            Ok(client
                .execute(
                    "UPDATE runs SET worker = $2, lease_until = $3
                     WHERE id = $1 AND status = 'running' AND worker IS NULL",
                    &[&run_id, &worker, &until],
                )
                .await?
                > 0)
        })
    }

    fn expired(
        &mut self,
        now: i64,
        limit: i64,
    ) -> Result<Vec<(String, Option<String>)>, JournalError> {
        self.call(async |client, _| {
            Ok(client
                .query(
                    "SELECT id, worker FROM runs
                     WHERE status = 'running' AND lease_until IS NOT NULL AND lease_until < $1
                     ORDER BY lease_until LIMIT $2",
                    &[&now, &limit],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
        })
    }

    fn requeue(
        &mut self,
        run_id: &str,
        worker: Option<&str>,
        now: i64,
        until: i64,
    ) -> Result<bool, JournalError> {
        self.call(async |client, _| {
            Ok(client
                .execute(
                    "UPDATE runs SET worker = NULL, lease_until = $4
                     WHERE id = $1 AND status = 'running' AND worker IS NOT DISTINCT FROM $2
                       AND lease_until < $3",
                    &[&run_id, &worker, &now, &until],
                )
                .await?
                > 0)
        })
    }

    fn orphaned(&mut self, before: i64) -> Result<Vec<Delivery>, JournalError> {
        self.call(async |client, _| {
            Ok(client
                .query(
                    &format!(
                        "SELECT {} FROM deliveries d
                         WHERE status = 'pending' AND received_at < $1
                           AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = d.run_id)
                         ORDER BY received_at, seq LIMIT 256",
                        super::DELIVERY_COLUMNS
                    ),
                    &[&before],
                )
                .await?
                .iter()
                .map(delivery_row)
                .collect())
        })
    }

    fn announce_plugin(
        &mut self,
        name: &str,
        action: &str,
        blob: Option<(&str, &[u8])>,
        approve: bool,
        worker: &str,
    ) -> Result<i64, JournalError> {
        let now = unix_ms(std::time::SystemTime::now());
        self.call(async |client, _| {
            if let Some((sha, bytes)) = blob {
                client
                    .execute(
                        "INSERT INTO plugin_blobs (sha256, bytes, at) VALUES ($1, $2, $3)
                         ON CONFLICT DO NOTHING",
                        &[&sha, &bytes, &now],
                    )
                    .await?;
            }
            Ok(client
                .query_one(
                    "INSERT INTO plugin_events (name, action, sha256, approve, worker, at)
                     VALUES ($1, $2, $3, $4, $5, $6) RETURNING seq",
                    &[&name, &action, &blob.map(|b| b.0), &approve, &worker, &now],
                )
                .await?
                .get(0))
        })
    }

    fn plugin_events(&mut self, after: i64) -> Result<Vec<PluginEvent>, JournalError> {
        self.call(async |client, _| {
            Ok(client
                .query(
                    "SELECT seq, name, action, sha256, approve, worker FROM plugin_events
                     WHERE seq > $1 ORDER BY seq",
                    &[&after],
                )
                .await?
                .iter()
                .map(|r| PluginEvent {
                    seq: r.get(0),
                    name: r.get(1),
                    action: r.get(2),
                    sha256: r.get(3),
                    approve: r.get(4),
                    worker: r.get(5),
                })
                .collect())
        })
    }

    fn plugin_blob(&mut self, sha256: &str) -> Result<Option<Vec<u8>>, JournalError> {
        self.call(async |client, _| {
            Ok(client
                .query_opt(
                    "SELECT bytes FROM plugin_blobs WHERE sha256 = $1",
                    &[&sha256],
                )
                .await?
                .map(|r| r.get(0)))
        })
    }

    fn open_circuit(
        &mut self,
        service: &str,
        open_ms: i64,
        worker: &str,
    ) -> Result<(), JournalError> {
        self.call(async |client, _| {
            client
                .execute(
                    "INSERT INTO breakers AS b (service, open_until, worker)
                     VALUES ($1, (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $2, $3)
                     ON CONFLICT (service) DO UPDATE
                     SET open_until = excluded.open_until, worker = excluded.worker",
                    &[&service, &open_ms, &worker],
                )
                .await?;
            Ok(())
        })
    }

    fn open_circuits(&mut self) -> Result<Vec<(String, i64, String)>, JournalError> {
        self.call(async |client, _| {
            Ok(client
                .query(
                    "SELECT service, open_until - (extract(epoch FROM clock_timestamp()) * 1000)::bigint,
                            worker
                     FROM breakers
                     WHERE open_until > (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                    &[],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect())
        })
    }

    fn take_token(
        &mut self,
        service: &str,
        period_us: i64,
        burst: u32,
    ) -> Result<i64, JournalError> {
        // The theoretical arrival time moves one period per call; a call is let through
        // while it is no further ahead of now than the burst allows.
        let tolerance = period_us * (i64::from(burst.max(1)) - 1);
        self.call(async |client, statements| {
            let taken = super::exec(
                client,
                statements,
                "INSERT INTO quotas AS q (service, tat)
                 VALUES ($1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint + $2)
                 ON CONFLICT (service) DO UPDATE
                 SET tat = GREATEST(q.tat, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint) + $2
                 WHERE GREATEST(q.tat, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
                       - (extract(epoch FROM clock_timestamp()) * 1000000)::bigint <= $3",
                &[&service, &period_us, &tolerance],
            )
            .await?;
            if taken > 0 {
                return Ok(0);
            }
            let wait: Option<i64> = client
                .query_opt(
                    "SELECT tat - (extract(epoch FROM clock_timestamp()) * 1000000)::bigint - $2
                     FROM quotas WHERE service = $1",
                    &[&service, &tolerance],
                )
                .await?
                .map(|r| r.get(0));
            Ok(wait.unwrap_or(0).max(1))
        })
    }
}

/// A session advisory lock, held on a connection of its own for as long as this lives.
struct AdvisoryLock {
    backend: PgBackend,
}

impl AdvisoryLock {
    fn try_take(url: &str, key: i64) -> Result<Option<AdvisoryLock>, JournalError> {
        let mut backend = PgBackend::open(url)?;
        let taken = in_own_thread(|| {
            backend.call(async |client, _| {
                Ok(client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                    .await?
                    .get::<_, bool>(0))
            })
        })?;
        Ok(taken.then_some(AdvisoryLock { backend }))
    }

    /// Still held: the connection that took it is the one alive (a server restart or a
    /// lost connection releases it, and the backend would reconnect without it).
    fn held(&mut self, key: i64) -> bool {
        let backend = &mut self.backend;
        if backend.client.as_ref().is_none_or(|c| c.is_closed()) {
            return false;
        }
        in_own_thread(|| {
            backend.call(async |client, _| {
                Ok(client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'
                           AND pid = pg_backend_pid() AND granted
                           AND ((classid::bigint << 32) | objid::bigint) = $1)",
                        &[&key],
                    )
                    .await?
                    .get::<_, bool>(0))
            })
        })
        .unwrap_or(false)
    }
}

/// A server's claim on a shared journal outside a cluster: one `fmhost serve` per
/// PostgreSQL journal, as `serve.lock` is for a state directory (it alone resumes the
/// runs journaled as the server's).
pub struct ServerLock {
    _lock: AdvisoryLock,
}

impl ServerLock {
    /// `Ok(None)` when another server holds the journal.
    pub fn try_take(url: &str) -> Result<Option<ServerLock>, JournalError> {
        Ok(AdvisoryLock::try_take(url, SERVER_LOCK)?.map(|l| ServerLock { _lock: l }))
    }
}

/// The cluster's leadership, held by one worker at a time.
pub struct Leadership {
    lock: AdvisoryLock,
}

impl Leadership {
    /// `Ok(None)` when another worker leads.
    pub fn try_take(url: &str) -> Result<Option<Leadership>, JournalError> {
        Ok(AdvisoryLock::try_take(url, LEADER_LOCK)?.map(|lock| Leadership { lock }))
    }

    /// Whether this worker still leads (blocking: one round trip).
    pub fn held(&mut self) -> bool {
        self.lock.held(LEADER_LOCK)
    }
}

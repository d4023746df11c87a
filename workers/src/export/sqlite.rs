//! SQLite export of merged windows, incremental and idempotent.
//!
//! Schema (documented in the README):
//!
//! ```sql
//! CREATE TABLE windows (
//!   series TEXT NOT NULL, field TEXT NOT NULL, resolution_secs INTEGER NOT NULL,
//!   start_ns INTEGER NOT NULL,            -- window start, Unix ns
//!   count INTEGER NOT NULL, sum REAL NOT NULL, min REAL NOT NULL, max REAL NOT NULL,
//!   mean REAL NOT NULL, first REAL NOT NULL, first_ts_ns INTEGER NOT NULL,
//!   last REAL NOT NULL, last_ts_ns INTEGER NOT NULL,
//!   PRIMARY KEY (series, field, resolution_secs, start_ns)) WITHOUT ROWID;
//! CREATE TABLE export_watermark (
//!   resolution_secs INTEGER PRIMARY KEY,
//!   exported_to_ns INTEGER NOT NULL,      -- windows before this were exported
//!   updated_at_ns INTEGER NOT NULL);
//! ```
//!
//! Rows are upserted on their primary key with the merged values, so running
//! the export again adds nothing twice; a window that late samples changed is
//! rewritten. Each run re-reads from `watermark − lateness` to pick those up.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::store::WindowRow;

/// SQLite failures.
#[derive(Debug, thiserror::Error)]
#[error("SQLite export to {path}: {source}")]
pub struct ExportError {
    /// The database file.
    pub path: String,
    /// The cause.
    #[source]
    pub source: rusqlite::Error,
}

/// An open export database.
pub struct SqliteExport {
    conn: Connection,
    path: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS windows (
  series TEXT NOT NULL, field TEXT NOT NULL, resolution_secs INTEGER NOT NULL,
  start_ns INTEGER NOT NULL,
  count INTEGER NOT NULL, sum REAL NOT NULL, min REAL NOT NULL, max REAL NOT NULL,
  mean REAL NOT NULL, first REAL NOT NULL, first_ts_ns INTEGER NOT NULL,
  last REAL NOT NULL, last_ts_ns INTEGER NOT NULL,
  PRIMARY KEY (series, field, resolution_secs, start_ns)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS export_watermark (
  resolution_secs INTEGER PRIMARY KEY,
  exported_to_ns INTEGER NOT NULL,
  updated_at_ns INTEGER NOT NULL);
";

impl SqliteExport {
    /// Opens (creating if needed) the database at `path` and its schema.
    ///
    /// # Errors
    /// [`ExportError`] if the file cannot be opened or the schema created.
    pub fn open(path: &Path) -> Result<Self, ExportError> {
        let p = path.display().to_string();
        let wrap = |source| ExportError {
            path: p.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(wrap)?;
        conn.execute_batch("PRAGMA journal_mode=WAL;")
            .map_err(wrap)?;
        conn.execute_batch(SCHEMA).map_err(wrap)?;
        Ok(Self { conn, path: p })
    }

    fn wrap(&self, source: rusqlite::Error) -> ExportError {
        ExportError {
            path: self.path.clone(),
            source,
        }
    }

    /// Windows before this time were exported at `resolution_secs` (None: never).
    ///
    /// # Errors
    /// [`ExportError`] on a database failure.
    pub fn watermark(&self, resolution_secs: u32) -> Result<Option<i64>, ExportError> {
        self.conn
            .query_row(
                "SELECT exported_to_ns FROM export_watermark WHERE resolution_secs = ?1",
                params![resolution_secs],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.wrap(e))
    }

    /// Upserts `rows` and moves the watermark to `exported_to_ns`, in one transaction.
    ///
    /// # Errors
    /// [`ExportError`] on a database failure (nothing is written then).
    pub fn write(
        &mut self,
        resolution_secs: u32,
        rows: &[WindowRow],
        exported_to_ns: i64,
        now_ns: i64,
    ) -> Result<usize, ExportError> {
        let path = self.path.clone();
        let wrap = |source| ExportError {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(wrap)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO windows (series, field, resolution_secs, start_ns, count, sum, min, max, mean, first, first_ts_ns, last, last_ts_ns)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                     ON CONFLICT (series, field, resolution_secs, start_ns) DO UPDATE SET
                       count = excluded.count, sum = excluded.sum, min = excluded.min, max = excluded.max,
                       mean = excluded.mean, first = excluded.first, first_ts_ns = excluded.first_ts_ns,
                       last = excluded.last, last_ts_ns = excluded.last_ts_ns",
                )
                .map_err(wrap)?;
            for r in rows {
                stmt.execute(params![
                    r.series,
                    r.field,
                    r.resolution_secs,
                    r.start_ns,
                    r.agg.count as i64,
                    r.agg.sum,
                    r.agg.min,
                    r.agg.max,
                    r.agg.mean(),
                    r.agg.first,
                    r.agg.first_ts_ns,
                    r.agg.last,
                    r.agg.last_ts_ns,
                ])
                .map_err(wrap)?;
            }
            tx.execute(
                "INSERT INTO export_watermark (resolution_secs, exported_to_ns, updated_at_ns) VALUES (?1, ?2, ?3)
                 ON CONFLICT (resolution_secs) DO UPDATE SET exported_to_ns = excluded.exported_to_ns, updated_at_ns = excluded.updated_at_ns",
                params![resolution_secs, exported_to_ns, now_ns],
            )
            .map_err(wrap)?;
        }
        tx.commit().map_err(wrap)?;
        Ok(rows.len())
    }

    /// Number of window rows stored.
    ///
    /// # Errors
    /// [`ExportError`] on a database failure.
    pub fn count(&self) -> Result<u64, ExportError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM windows", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| self.wrap(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::Aggregate;

    fn row(series: &str, start: i64, agg: Aggregate) -> WindowRow {
        WindowRow {
            series: series.into(),
            field: "t".into(),
            resolution_secs: 60,
            start_ns: start,
            agg,
        }
    }

    #[test]
    fn rerunning_the_export_adds_nothing_twice_and_updates_changed_windows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let mut db = SqliteExport::open(&path).unwrap();
        assert_eq!(db.watermark(60).unwrap(), None);
        let rows = vec![
            row("a", 0, Aggregate::of(1, 2.0)),
            row("b", 0, Aggregate::of(1, 3.0)),
        ];
        db.write(60, &rows, 100, 1).unwrap();
        db.write(60, &rows, 100, 2).unwrap();
        assert_eq!(db.count().unwrap(), 2);
        let mut late = Aggregate::of(1, 2.0);
        late.merge(&Aggregate::of(2, 4.0));
        db.write(60, &[row("a", 0, late)], 200, 3).unwrap();
        drop(db);
        let db = SqliteExport::open(&path).unwrap();
        assert_eq!(db.count().unwrap(), 2);
        assert_eq!(db.watermark(60).unwrap(), Some(200));
        let (count, sum): (i64, f64) = db
            .conn
            .query_row(
                "SELECT count, sum FROM windows WHERE series = 'a'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((count, sum), (2, 6.0));
    }
}

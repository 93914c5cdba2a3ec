use std::time::Duration;

use super::*;
use crate::hub::state::{OperatorAction, OperatorEntry};
use crate::identity::verify::SerialCheck;

fn grant(client: &str) -> TokenGrant {
    TokenGrant {
        client: client.into(),
        webhook: None,
        revocations: 0,
    }
}

fn id(name: &str) -> SpiffeId {
    SpiffeId::client("example.org", name).unwrap()
}

fn row(session_id: u64, serial: &str, since: i64) -> SessionRow {
    SessionRow {
        session_id,
        serial: serial.into(),
        peer: "p".into(),
        since,
    }
}

/// Serial `0a` of acme renewed as `0b` for `key-1`.
fn acme_renewal() -> RenewalRow {
    RenewalRow {
        client: "acme".into(),
        from: "0a".into(),
        serial: "0b".into(),
        key_sha256: b"key-1".to_vec(),
        der: b"cert-0b".to_vec(),
        not_after: 1000,
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A store on the database at `path` with client `acme` enrolled (serial `0a`).
async fn with_acme(path: &Path) -> Store {
    let (store, _changes) = Store::open(path, 1).await.unwrap();
    store
        .record_enrolment(grant("acme"), id("acme"), "0a".into(), 1000, 1)
        .await
        .unwrap();
    store
}

async fn next_change(rx: &mut mpsc::UnboundedReceiver<Change>) -> Change {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a change in time")
        .expect("the store is running")
}

#[test]
fn an_unloaded_view_refuses_every_serial() {
    let view = View::default();
    assert_eq!(
        view.check(&id("acme"), "0a"),
        Err(SerialRefusal::StoreUnavailable(
            "the Hub's serial records are not loaded".into()
        ))
    );
    assert_eq!(view.next_silent_deadline(1), None);
}

#[tokio::test]
async fn the_view_follows_the_owners_writes_and_reports_retirements() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut changes) = Store::open(&dir.path().join("hub.db"), 1).await.unwrap();
    let acme = id("acme");
    assert!(matches!(
        store.view().check(&acme, "0a"),
        Err(SerialRefusal::Unknown { .. })
    ));
    store
        .record_enrolment(grant("acme"), acme.clone(), "0a".into(), 1000, 1)
        .await
        .unwrap();
    assert_eq!(store.view().check(&acme, "0a"), Ok(()));
    assert_eq!(
        store.may_renew("acme", &acme, "0a", b"key-1").await,
        Ok(Renewal::Fresh)
    );
    let renewal = acme_renewal();
    assert_eq!(
        store
            .record_renewal(renewal.clone(), &acme, 2)
            .await
            .unwrap(),
        Ok(Renewal::Fresh)
    );
    // A serial renews once: the same key asking again gets the same certificate; another key
    // is refused.
    assert_eq!(
        store.may_renew("acme", &acme, "0a", b"key-1").await,
        Ok(Renewal::Again(renewal))
    );
    assert_eq!(
        store.may_renew("acme", &acme, "0a", b"key-2").await,
        Err(RenewalRefusal::AlreadyRenewed {
            serial: "0a".into(),
            to: "0b".into()
        })
    );
    // The renewed serial comes into use: the first retires, and may not renew any more.
    assert_eq!(store.session_up("acme", row(7, "0b", 3)).await.unwrap(), 1);
    assert_eq!(
        next_change(&mut changes).await,
        Change::Retired {
            client: "acme".into(),
            serials: vec!["0a".into()]
        }
    );
    assert_eq!(next_change(&mut changes).await, Change::Seen);
    assert_eq!(
        store.view().check(&acme, "0a"),
        Err(SerialRefusal::Retired {
            serial: "0a".into(),
            id: acme.to_string()
        })
    );
    assert_eq!(store.view().superseded("acme", "0a"), Some(true));
    assert!(matches!(
        store.may_renew("acme", &acme, "0a", b"key-1").await,
        Err(RenewalRefusal::Serial(SerialRefusal::Retired { .. }))
    ));
    // A live session holds off the grace; once it ends, the deadline is last_seen + grace + 1.
    assert_eq!(store.view().next_silent_deadline(60), None);
    // Dated by the store's own reading of the clock.
    let before = crate::now_timestamp().unix_secs() as i64;
    store.session_down("acme", 7).await.unwrap();
    let after = crate::now_timestamp().unix_secs() as i64;
    let deadline = store.view().next_silent_deadline(60).unwrap();
    assert!((before + 61..=after + 61).contains(&deadline), "{deadline}");
    let seen = deadline - 61;
    // The Hub's clock moved (its host slept an hour, then a step back of as much): the grace
    // moves with it.
    store.clock_moved(Moved::Ahead(secs(3_600))).await.unwrap();
    let moved = Some(deadline + 3_600);
    assert_eq!(store.view().next_silent_deadline(60), moved);
    assert!(store.view().silent_since(seen + 3_600).is_empty());
    store.clock_moved(Moved::Back(secs(3_600))).await.unwrap();
    assert_eq!(store.view().next_silent_deadline(60), Some(deadline));
    // Moves under a second add up.
    for _ in 0..4 {
        store
            .clock_moved(Moved::Back(Duration::from_millis(250)))
            .await
            .unwrap();
    }
    assert_eq!(store.view().next_silent_deadline(60), Some(deadline - 1));
    store.clock_moved(Moved::Ahead(secs(1))).await.unwrap();
    assert!(store.view().silent_since(seen).is_empty());
    assert_eq!(
        store.view().silent_since(seen + 1),
        vec![("acme".to_string(), acme.to_string())]
    );
    // This Hub's own revocation: reported at once, checked from memory.
    assert!(store
        .revoke("acme", "test", 11, false, Revoker::Hub)
        .await
        .unwrap());
    loop {
        match next_change(&mut changes).await {
            Change::Seen => continue,
            other => {
                assert_eq!(
                    other,
                    Change::Revoked {
                        client: "acme".into(),
                        reason: "test".into(),
                    }
                );
                break;
            }
        }
    }
    assert_eq!(
        store.view().check(&acme, "0b"),
        Err(SerialRefusal::Revoked {
            id: acme.to_string()
        })
    );
    assert_eq!(
        store.view().next_silent_deadline(60),
        None,
        "revoked: no grace"
    );
}

/// A renewal is for a fresh key (P8): a key any earlier serial of the client certified, its
/// enrolment's included, is refused, so that a Client alternating keys (A, B, A) cannot bring a
/// copy of an old key back to life; the same key asking again for the same serial's renewal
/// (its answer lost) still gets that renewal.
#[tokio::test]
async fn p8_a_renewal_for_a_key_the_client_held_before_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _changes) = Store::open(&dir.path().join("hub.db"), 1).await.unwrap();
    let acme = id("acme");
    let enrolled = IssuedSerial {
        serial: "0a".into(),
        key_sha256: Some(b"key-0".to_vec()),
    };
    store
        .record_enrolment(grant("acme"), acme.clone(), enrolled, 1000, 1)
        .await
        .unwrap();
    let renew = |from: &str, to: &str, key: &[u8]| RenewalRow {
        client: "acme".into(),
        from: from.into(),
        serial: to.into(),
        key_sha256: key.to_vec(),
        der: format!("cert-{to}").into_bytes(),
        not_after: 1000,
    };
    let reused = |earlier: &str| {
        Err(RenewalRefusal::KeyReused {
            earlier: earlier.into(),
        })
    };
    // 0a (key-0) renews to 0b (key-1), which comes into use.
    assert_eq!(
        store.may_renew("acme", &acme, "0a", b"key-0").await,
        reused("0a"),
        "its own key"
    );
    assert_eq!(
        store
            .record_renewal(renew("0a", "0b", b"key-1"), &acme, 2)
            .await
            .unwrap(),
        Ok(Renewal::Fresh)
    );
    store.session_up("acme", row(7, "0b", 3)).await.unwrap();
    // 0b may not go back to the enrolment's key, nor keep its own.
    assert_eq!(
        store.may_renew("acme", &acme, "0b", b"key-0").await,
        reused("0a")
    );
    assert_eq!(
        store.may_renew("acme", &acme, "0b", b"key-1").await,
        reused("0b")
    );
    // Decided again with the write.
    assert_eq!(
        store
            .record_renewal(renew("0b", "0c", b"key-0"), &acme, 4)
            .await
            .unwrap(),
        reused("0a")
    );
    // A fresh key renews; asked again (the answer lost), the same renewal comes back.
    let fresh = renew("0b", "0c", b"key-2");
    assert_eq!(
        store.record_renewal(fresh.clone(), &acme, 4).await.unwrap(),
        Ok(Renewal::Fresh)
    );
    assert_eq!(
        store.may_renew("acme", &acme, "0b", b"key-2").await,
        Ok(Renewal::Again(fresh))
    );
    // 0c in use: back to key-1 (A, B, A) is refused.
    store.session_up("acme", row(8, "0c", 5)).await.unwrap();
    assert_eq!(
        store.may_renew("acme", &acme, "0c", b"key-1").await,
        reused("0b")
    );
    assert_eq!(
        store.may_renew("acme", &acme, "0c", b"key-3").await,
        Ok(Renewal::Fresh)
    );
}

#[tokio::test]
async fn p8_a_session_with_another_clients_serial_marks_nothing_of_that_client() {
    // A federated Client's CA chooses its own serials: one may equal a serial this Hub issued
    // to another Client. Its session must not mark that serial used (which would make the
    // other Client's current serial superseded, and refuse its renewal).
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hub.db");
    let (store, _changes) = Store::open(&db, 1).await.unwrap();
    let acme = id("acme");
    store
        .record_enrolment(grant("acme"), acme.clone(), "0a".into(), 1000, 1)
        .await
        .unwrap();
    assert_eq!(
        store
            .record_renewal(acme_renewal(), &acme, 2)
            .await
            .unwrap(),
        Ok(Renewal::Fresh)
    );
    store
        .record_enrolment(grant("other"), id("other"), "0c".into(), 1000, 3)
        .await
        .unwrap();
    assert_eq!(store.session_up("other", row(9, "0b", 4)).await.unwrap(), 0);
    assert_eq!(store.view().superseded("acme", "0a"), Some(false));
    assert_eq!(store.view().check(&acme, "0a"), Ok(()));
    assert_eq!(
        store
            .may_renew("acme", &acme, "0a", b"key-1")
            .await
            .map(|_| ()),
        Ok(())
    );
    // Nor in the database: a view loaded afresh says the same.
    drop(store);
    let (again, _changes) = Store::open(&db, 5).await.unwrap();
    assert_eq!(again.view().superseded("acme", "0a"), Some(false));
}

#[tokio::test]
async fn another_process_commit_is_noticed_by_one_pragma_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let (store, mut changes) = Store::open(&path, 1).await.unwrap();
    let acme = id("acme");
    store
        .record_enrolment(grant("acme"), acme.clone(), "0a".into(), 1000, 1)
        .await
        .unwrap();
    while changes.try_recv().is_ok() {}
    // Nothing changed: one pragma, no statement.
    let (stmts, checks) = (store.counts().statements(), store.counts().change_checks());
    assert!(!store.refresh().await.unwrap());
    assert!(!store.refresh().await.unwrap());
    assert_eq!(store.counts().statements(), stmts);
    assert_eq!(store.counts().change_checks(), checks + 2);
    // `ewii-hub revoke` in another process.
    let other = Db::open(&path).unwrap();
    assert!(other
        .revoke_client("acme", "contract ended", 5, false)
        .unwrap());
    assert!(store.refresh().await.unwrap());
    assert!(store.counts().statements() > stmts, "the reload is counted");
    assert_eq!(
        next_change(&mut changes).await,
        Change::Revoked {
            client: "acme".into(),
            reason: "contract ended".into(),
        }
    );
    assert_eq!(
        store.view().check(&acme, "0a"),
        Err(SerialRefusal::Revoked {
            id: acme.to_string()
        })
    );
}

#[tokio::test]
async fn a_store_that_cannot_be_read_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let store = with_acme(&path).await;
    // Another process breaks the schema: the next reload fails, and so does every check.
    let other = Db::open(&path).unwrap();
    drop(other);
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch("ALTER TABLE serials RENAME TO gone")
        .unwrap();
    drop(raw);
    assert!(store.refresh().await.is_err());
    assert!(matches!(
        store.view().check(&id("acme"), "0a"),
        Err(SerialRefusal::StoreUnavailable(_))
    ));
    assert!(matches!(
        store.may_renew("acme", &id("acme"), "0a", b"key").await,
        Err(RenewalRefusal::Serial(SerialRefusal::StoreUnavailable(_)))
    ));
}

#[tokio::test]
async fn p8_a_serial_renews_once_also_when_two_keys_ask_at_the_same_moment() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _changes) = Store::open(&dir.path().join("hub.db"), 1).await.unwrap();
    let acme = id("acme");
    store
        .record_enrolment(grant("acme"), acme.clone(), "0a".into(), 1000, 1)
        .await
        .unwrap();
    // The Client and a copy of its key ask at once: both are told "sign" before either's
    // certificate is recorded.
    for key in [&b"key-1"[..], b"key-2"] {
        assert_eq!(
            store.may_renew("acme", &acme, "0a", key).await,
            Ok(Renewal::Fresh)
        );
    }
    let first = acme_renewal();
    let copy = RenewalRow {
        serial: "0c".into(),
        key_sha256: b"key-2".to_vec(),
        der: b"cert-0c".to_vec(),
        ..acme_renewal()
    };
    assert_eq!(
        store.record_renewal(first.clone(), &acme, 2).await.unwrap(),
        Ok(Renewal::Fresh)
    );
    // The second signature is refused when it is recorded, with the alarm of a copied key,
    // and nothing is recorded for it.
    assert_eq!(
        store.record_renewal(copy, &acme, 2).await.unwrap(),
        Err(RenewalRefusal::AlreadyRenewed {
            serial: "0a".into(),
            to: "0b".into()
        })
    );
    assert!(matches!(
        store.view().check(&acme, "0c"),
        Err(SerialRefusal::Unknown { .. })
    ));
    // The same key racing itself (its answer lost, asked again at once) gets the one
    // recorded certificate.
    let again = RenewalRow {
        serial: "0d".into(),
        der: b"cert-0d".to_vec(),
        ..acme_renewal()
    };
    assert_eq!(
        store.record_renewal(again, &acme, 2).await.unwrap(),
        Ok(Renewal::Again(first))
    );
    // A re-enrolment recorded after the answer to sign retires the serial: its renewal is
    // not recorded beside the new key.
    store
        .record_enrolment(grant("beta"), id("beta"), "1a".into(), 1000, 3)
        .await
        .unwrap();
    assert_eq!(
        store.may_renew("beta", &id("beta"), "1a", b"key-3").await,
        Ok(Renewal::Fresh)
    );
    store
        .record_enrolment(grant("beta"), id("beta"), "1b".into(), 1000, 4)
        .await
        .unwrap();
    let late = RenewalRow {
        client: "beta".into(),
        from: "1a".into(),
        serial: "1c".into(),
        key_sha256: b"key-3".to_vec(),
        der: b"cert-1c".to_vec(),
        not_after: 1000,
    };
    assert!(matches!(
        store.record_renewal(late, &id("beta"), 5).await.unwrap(),
        Err(RenewalRefusal::Serial(SerialRefusal::Retired { .. }))
    ));
    assert!(matches!(
        store.view().check(&id("beta"), "1c"),
        Err(SerialRefusal::Unknown { .. })
    ));
}

/// Renames `table` in the database at `path` from another connection (as another process
/// could break it, or a repair make it whole again).
fn rename_table(path: &Path, from: &str, to: &str) {
    let raw = rusqlite::Connection::open(path).unwrap();
    raw.execute_batch(&format!("ALTER TABLE {from} RENAME TO {to}"))
        .unwrap();
}

/// A move of the clock whose write the database refuses (here: a trigger refuses a move of an
/// hour) is kept in the view, applied to every view loaded meanwhile, and written once it can
/// be: a reload never brings back the unmoved grace (after a suspend, that would revoke every
/// silent Client at once). A session that ends meanwhile is moved once, not twice.
#[tokio::test]
async fn p9_a_grace_move_the_database_could_not_take_survives_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let store = with_acme(&path).await;
    store
        .record_enrolment(grant("beta"), id("beta"), "0b".into(), 1000, 1)
        .await
        .unwrap();
    store.session_up("acme", row(7, "0a", 1)).await.unwrap();
    store.session_up("beta", row(8, "0b", 1)).await.unwrap();
    store.session_down("acme", 7).await.unwrap();
    let deadline = store.view().next_silent_deadline(60).unwrap();
    // Read from another connection, which also changes the database as another process.
    let raw = |sql: &str| {
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(sql)
            .unwrap()
    };
    let stored = |name: &str| -> Option<i64> {
        let raw = rusqlite::Connection::open(&path).unwrap();
        let sql = "SELECT last_seen FROM clients WHERE name = ?1";
        raw.query_row(sql, [name], |r| r.get(0)).unwrap()
    };
    assert_eq!(stored("acme"), Some(deadline - 61));
    raw(
        "CREATE TRIGGER refuse BEFORE UPDATE OF last_seen ON clients \
         WHEN NEW.last_seen = OLD.last_seen + 3600 BEGIN SELECT RAISE(ABORT, 'refused'); END",
    );
    assert!(store.refresh().await.unwrap());
    store.clock_moved(Moved::Ahead(secs(3_600))).await.unwrap();
    let moved = Some(deadline + 3_600);
    assert_eq!(store.view().next_silent_deadline(60), moved);
    assert_eq!(stored("acme"), Some(deadline - 61), "not written");
    // beta's session ends after the move, while the database still lacks it.
    let before = crate::now_timestamp().unix_secs() as i64;
    store.session_down("beta", 8).await.unwrap();
    let after = crate::now_timestamp().unix_secs() as i64;
    // Whether `name` is silent since before `at`; `seen` is silent from exactly `seen` on.
    let silent = |name: &str, at: i64| {
        let silent = store.view().silent_since(at);
        silent.iter().any(|(n, _)| n == name)
    };
    let seen_at = |name: &str, seen: i64| !silent(name, seen) && silent(name, seen + 1);
    let beta_seen = |at: std::ops::RangeInclusive<i64>| at.into_iter().any(|t| seen_at("beta", t));
    assert!(beta_seen(before..=after));
    // Another process committed: the view is loaded again from the database.
    raw("CREATE TABLE another_process (x)");
    assert!(store.refresh().await.unwrap());
    assert!(seen_at("acme", deadline - 61 + 3_600));
    assert!(beta_seen(before..=after));
    // Once the database can take it, the next job writes it, once, for both.
    raw("DROP TRIGGER refuse");
    assert!(store.refresh().await.unwrap());
    assert!(seen_at("acme", deadline - 61 + 3_600));
    assert_eq!(stored("acme"), Some(deadline - 61 + 3_600));
    let beta = stored("beta").unwrap();
    assert!(
        (before..=after).contains(&beta),
        "{beta} not in {before}..={after}"
    );
    assert!(!store.refresh().await.unwrap());
    assert_eq!(stored("acme"), Some(deadline - 61 + 3_600));
}

/// A step back of the clock moves every pending webhook retry with it (it keeps its delay);
/// a suspend or a step ahead moves none (those that fell due go at once).
#[tokio::test]
async fn p10_a_step_back_of_the_clock_moves_the_webhook_retries_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _changes) = Store::open(&dir.path().join("hub.db"), 1).await.unwrap();
    let mut with_webhook = grant("acme");
    with_webhook.webhook = Some("https://example.org/hook".into());
    store
        .record_enrolment(with_webhook, id("acme"), "0a".into(), 1000, 1)
        .await
        .unwrap();
    assert!(store
        .revoke("acme", "test", 2, true, Revoker::Hub)
        .await
        .unwrap());
    let any = DueBy {
        now_ms: 0,
        latest_ms: i64::MAX - 1,
    };
    let pending = store
        .due_webhooks(DueBy { now_ms: 1, ..any }, 5, vec![])
        .await
        .unwrap();
    let at = store
        .webhook_failed(&pending[0].id, "HTTP 500", secs(600))
        .await
        .unwrap();
    let now = crate::now_timestamp().0 as i64 / 1000;
    assert!((now + 590_000..=now + 600_000).contains(&at), "{at}");
    assert_eq!(store.next_webhook_due(5, any).await.unwrap(), Some(at));
    store
        .clock_moved(Moved::Back(Duration::from_millis(3_600_500)))
        .await
        .unwrap();
    assert_eq!(
        store.next_webhook_due(5, any).await.unwrap(),
        Some(at - 3_600_500)
    );
    store.clock_moved(Moved::Ahead(secs(3_600))).await.unwrap();
    assert_eq!(
        store.next_webhook_due(5, any).await.unwrap(),
        Some(at - 3_600_500)
    );
}

/// A Client the grace revoked, enrolled again: the running Hub does not find it silent (it
/// has no grace until its first session), in memory as in the database.
#[tokio::test]
async fn p9_a_client_enrolled_again_after_the_grace_revoked_it_is_not_silent() {
    let dir = tempfile::tempdir().unwrap();
    let store = with_acme(&dir.path().join("hub.db")).await;
    store.session_up("acme", row(7, "0a", 1)).await.unwrap();
    store.session_down("acme", 7).await.unwrap();
    assert_eq!(store.silent(-10).await.unwrap().len(), 1);
    assert!(store
        .revoke("acme", "no session", 2, false, Revoker::Hub)
        .await
        .unwrap());
    // (A token made after the revocation.)
    let again = TokenGrant {
        revocations: 1,
        ..grant("acme")
    };
    store
        .record_enrolment(again, id("acme"), "0c".into(), 1000, 3)
        .await
        .unwrap();
    assert_eq!(store.silent(-10).await.unwrap(), vec![]);
    assert_eq!(store.view().next_silent_deadline(0), None);
}

/// The grace revokes a Client only if it is still silent when the store comes to it: one
/// that came back after it was listed is left alone.
#[tokio::test]
async fn p9_a_client_back_before_its_grace_revocation_is_not_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let store = with_acme(&dir.path().join("hub.db")).await;
    store.session_up("acme", row(7, "0a", 1)).await.unwrap();
    store.session_down("acme", 7).await.unwrap();
    // (A grace of -10 s: silent since now, for the test.)
    assert_eq!(store.silent(-10).await.unwrap().len(), 1);
    store.session_up("acme", row(8, "0a", 2)).await.unwrap();
    assert!(!store.revoke_if_silent("acme", "grace", -10).await.unwrap());
    assert_eq!(store.view().revocation("acme"), None);
    store.session_down("acme", 8).await.unwrap();
    assert!(store.revoke_if_silent("acme", "grace", -10).await.unwrap());
    assert_eq!(store.view().revocation("acme").as_deref(), Some("grace"));
}

fn drain(changes: &mut mpsc::UnboundedReceiver<Change>) -> Vec<Change> {
    std::iter::from_fn(|| changes.try_recv().ok())
        .filter(|c| *c != Change::Seen)
        .collect()
}

#[tokio::test]
async fn p12_a_failed_reload_forgets_neither_the_live_sessions_nor_what_changed_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let (store, mut changes) = Store::open(&path, 1).await.unwrap();
    for (name, serial, session) in [("acme", "0a", 7), ("beta", "0b", 8)] {
        store
            .record_enrolment(grant(name), id(name), serial.into(), 1000, 1)
            .await
            .unwrap();
        store
            .session_up(name, row(session, serial, 2))
            .await
            .unwrap();
    }
    // Both are connected: however long ago they were last seen, neither is silent.
    assert!(store.view().silent_since(1_000_000).is_empty());
    // beta is revoked by other means than `ewii-hub revoke` (an older ewii-hub, SQL by hand):
    // the view alone tells the Hub to close its sessions.
    let other = Db::open(&path).unwrap();
    assert!(other.revoke_client("beta", "by hand", 5, false).unwrap());
    drain(&mut changes);
    // The reload fails (the schema is broken) and the view refuses every check...
    rename_table(&path, "serials", "gone");
    assert!(store.refresh().await.is_err());
    assert!(!store.view().available());
    assert!(drain(&mut changes).is_empty());
    // ...until it works again.
    rename_table(&path, "gone", "serials");
    assert!(store.refresh().await.unwrap());
    assert_eq!(store.view().check(&id("acme"), "0a"), Ok(()));
    assert_eq!(
        drain(&mut changes),
        vec![Change::Revoked {
            client: "beta".into(),
            reason: "by hand".into(),
        }],
        "the revocation committed while the view could not be read closes beta's sessions"
    );
    assert!(
        store.view().silent_since(1_000_000).is_empty(),
        "acme's session is still up: the silent-client grace must not revoke it"
    );
    // A session that ends while the view cannot be read is gone when it can again.
    rename_table(&path, "serials", "gone");
    assert!(store.refresh().await.is_err());
    store.session_down("acme", 7).await.unwrap();
    rename_table(&path, "gone", "serials");
    assert!(store.refresh().await.unwrap());
    assert_eq!(
        store.view().silent_since(i64::MAX),
        vec![("acme".to_string(), id("acme").to_string())]
    );
}

#[tokio::test]
async fn p11_p12_an_operators_revocation_closes_nothing_until_its_record_can_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let (store, mut changes) = Store::open(&path, 1).await.unwrap();
    store
        .record_enrolment(grant("acme"), id("acme"), "0a".into(), 1000, 1)
        .await
        .unwrap();
    store.session_up("acme", row(7, "0a", 2)).await.unwrap();
    drain(&mut changes);
    // `ewii-hub revoke` commits the revocation and its log entry; then the log cannot be read.
    let other = Db::open(&path).unwrap();
    assert!(other.revoke_by_operator("acme", "ended", 5).unwrap().0);
    rename_table(&path, "operator_log", "gone");
    assert!(
        store.refresh().await.is_err(),
        "the reload fails as a whole"
    );
    assert!(
        drain(&mut changes).is_empty(),
        "no session closed for a revocation whose record is not written"
    );
    assert!(!store.view().available(), "and the view fails closed");
    rename_table(&path, "gone", "operator_log");
    assert!(store.refresh().await.unwrap());
    let after = drain(&mut changes);
    assert!(
        matches!(
            &after[..],
            [Change::Operator(OperatorEntry { action: OperatorAction::Revoked { reason, .. }, .. }), Change::Revoked { client, .. }]
                if reason == "ended" && client == "acme"
        ),
        "the record first, then the closing: {after:?}"
    );
}

/// Refuses every delete of a session's row (a session's end), until dropped as `refuse`.
const REFUSE_SESSION_ENDS: &str =
    "CREATE TRIGGER refuse BEFORE DELETE ON sessions BEGIN SELECT RAISE(ABORT, 'refused'); END";

/// A store on a new database in `dir` with `acme` enrolled and in session 7 (since 1).
async fn acme_in_session(dir: &tempfile::TempDir) -> (Store, PathBuf) {
    let path = dir.path().join("hub.db");
    let store = with_acme(&path).await;
    store.session_up("acme", row(7, "0a", 1)).await.unwrap();
    (store, path)
}

/// Runs `sql` on the database at `path` from a connection of its own (another process).
fn raw(path: &Path, sql: &str) {
    rusqlite::Connection::open(path)
        .unwrap()
        .execute_batch(sql)
        .unwrap()
}

/// `client`'s `last_seen` in the database, and the session ids of its rows.
fn stored_of(path: &Path, client: &str) -> (Option<i64>, Vec<i64>) {
    let raw = rusqlite::Connection::open(path).unwrap();
    let seen = raw
        .query_row(
            "SELECT last_seen FROM clients WHERE name = ?1",
            [client],
            |r| r.get(0),
        )
        .unwrap();
    let mut rows = raw
        .prepare("SELECT session_id FROM sessions WHERE client = ?1")
        .unwrap();
    let ids = rows.query_map([client], |r| r.get(0)).unwrap();
    (seen, ids.map(Result::unwrap).collect())
}

/// A session's end whose write the database refuses (here: a trigger refuses to delete a
/// session's row) is kept by the running Hub: a reload meanwhile does not bring back the
/// session's start as the client's `last_seen` (the silent-client grace would count from there
/// and revoke a Client that had just left), and the next job once the database takes writes
/// again writes the end.
#[tokio::test]
async fn p9_a_session_end_the_database_could_not_take_survives_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let (store, path) = acme_in_session(&dir).await;
    let raw = |sql: &str| raw(&path, sql);
    let stored = || {
        let (seen, rows) = stored_of(&path, "acme");
        (seen, rows.len())
    };
    raw(REFUSE_SESSION_ENDS);
    assert!(store.refresh().await.unwrap());
    let before = crate::now_timestamp().unix_secs() as i64;
    assert!(store.session_down("acme", 7).await.is_err());
    let after = crate::now_timestamp().unix_secs() as i64;
    assert_eq!(stored(), (Some(1), 1), "not written");
    // Silent from exactly `seen` on.
    let seen_at = |seen: i64| {
        let silent = |at: i64| store.view().is_silent("acme", at);
        !silent(seen) && silent(seen + 1)
    };
    let seen_now = || (before..=after).any(seen_at);
    assert!(seen_now());
    // Another process committed: the view is loaded again from the database.
    raw("CREATE TABLE another_process (x)");
    assert!(store.refresh().await.unwrap());
    assert!(seen_now(), "the reload brought back the session's start");
    // Once the database takes writes, the next job writes the end, once.
    raw("DROP TRIGGER refuse");
    assert!(store.refresh().await.unwrap());
    let (seen, rows) = stored();
    assert_eq!(rows, 0, "the session's row is gone");
    assert!(
        seen.is_some_and(|s| (before..=after).contains(&s)),
        "{seen:?} not in {before}..={after}"
    );
    assert!(seen_now());
    // Written once: the jobs after it make no statement.
    let statements = store.counts().statements();
    assert!(!store.refresh().await.unwrap());
    assert!(!store.refresh().await.unwrap());
    assert_eq!(store.counts().statements(), statements);
}

/// A session's end the database refused does not undo what came after it: an operator's
/// `readmit` in another process (which clears the grace until the Client's next session) stays
/// cleared, in the view and in the database, whether the view is loaded again while the end is
/// still refused (acme) or the database takes writes again before it is (beta: the retry comes
/// first, at the start of the next job); and the client's next session takes the row, so the
/// old end has nothing left to write.
#[tokio::test]
async fn p9_an_unwritten_session_end_keeps_a_readmits_cleared_grace_and_yields_to_a_new_session() {
    let dir = tempfile::tempdir().unwrap();
    let (store, path) = acme_in_session(&dir).await;
    store
        .record_enrolment(grant("beta"), id("beta"), "0b".into(), 1000, 1)
        .await
        .unwrap();
    store.session_up("beta", row(8, "0b", 1)).await.unwrap();
    let raw = |sql: &str| raw(&path, sql);
    let refuse = REFUSE_SESSION_ENDS;
    let stored = |client: &str| stored_of(&path, client);
    // What a reload costs alone, with nothing to write.
    raw("CREATE TABLE another_process (x)");
    let statements = store.counts().statements();
    assert!(store.refresh().await.unwrap());
    let reload = store.counts().statements() - statements;
    raw(refuse);
    assert!(store.refresh().await.unwrap());
    assert!(store.session_down("acme", 7).await.is_err());
    assert!(store.session_down("beta", 8).await.is_err());
    let graced = |client: &str| {
        let silent = store.view().silent_since(i64::MAX);
        silent.iter().any(|(n, _)| n == client)
    };
    assert!(graced("acme") && graced("beta"));
    // The operator revokes acme, then readmits it, from another process; the view is loaded
    // again while the ends are still refused.
    let other = Db::open(&path).unwrap();
    let readmit = |client: &str| {
        assert!(other.revoke_client(client, "by mistake", 5, false).unwrap());
        assert!(other.readmit(client).unwrap());
    };
    readmit("acme");
    assert!(store.refresh().await.unwrap());
    assert!(
        !graced("acme"),
        "readmitted: no grace until its next session"
    );
    assert!(graced("beta"));
    // beta is readmitted, and the database takes writes again, before any job.
    readmit("beta");
    raw("DROP TRIGGER refuse");
    assert!(store.refresh().await.unwrap());
    for client in ["acme", "beta"] {
        assert_eq!(
            stored(client),
            (None, vec![]),
            "{client}: the row deleted, the grace left cleared"
        );
        assert!(!graced(client), "{client}");
    }

    // Refused again; then the client's next session takes the row.
    store.session_up("acme", row(18, "0a", 2)).await.unwrap();
    raw(refuse);
    assert!(store.refresh().await.unwrap());
    assert!(store.session_down("acme", 18).await.is_err());
    store.session_up("acme", row(19, "0a", 3)).await.unwrap();
    raw("DROP TRIGGER refuse");
    assert_eq!(stored("acme"), (Some(3), vec![19]));
    let statements = store.counts().statements();
    assert!(store.refresh().await.unwrap());
    assert!(!store.refresh().await.unwrap());
    assert_eq!(stored("acme"), (Some(3), vec![19]));
    assert_eq!(
        store.counts().statements() - statements,
        reload,
        "the reload only: the old end has nothing to write"
    );
}

/// A session that outlives its client's revocation and `readmit` (both from another process,
/// before this Hub closed it) ends without starting a grace, in the view as in the database: a
/// readmitted client has none until its next session.
#[tokio::test]
async fn p9_a_session_ending_after_its_clients_readmit_starts_no_grace() {
    let dir = tempfile::tempdir().unwrap();
    let (store, path) = acme_in_session(&dir).await;
    let other = Db::open(&path).unwrap();
    assert!(other.revoke_client("acme", "by mistake", 5, false).unwrap());
    assert!(other.readmit("acme").unwrap());
    assert!(store.refresh().await.unwrap());
    store.session_down("acme", 7).await.unwrap();
    let graced = || {
        let silent = store.view().silent_since(i64::MAX);
        silent.iter().any(|(n, _)| n == "acme")
    };
    assert_eq!(stored_of(&path, "acme"), (None, vec![]));
    assert!(
        !graced(),
        "the view started a grace the database does not have"
    );
    // The next session starts one again, as it ends.
    store.session_up("acme", row(8, "0a", 2)).await.unwrap();
    store.session_down("acme", 8).await.unwrap();
    assert!(graced());
    assert!(stored_of(&path, "acme").0.is_some());
}

/// A session start the database refuses is not applied to the view either (the Hub refuses
/// that session): the view never holds a start a reload would undo. The client's older serial
/// stays current and its new one unused, and its grace runs on.
#[tokio::test]
async fn p8_a_session_start_the_database_refuses_leaves_the_view_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (store, path) = acme_in_session(&dir).await;
    store
        .record_renewal(acme_renewal(), &id("acme"), 2)
        .await
        .unwrap()
        .unwrap();
    store.session_down("acme", 7).await.unwrap();
    raw(
        &path,
        "CREATE TRIGGER refuse BEFORE INSERT ON sessions BEGIN SELECT RAISE(ABORT, 'disk full'); END",
    );
    assert!(store.refresh().await.unwrap());
    let graced = || {
        let silent = store.view().silent_since(i64::MAX);
        silent.iter().any(|(n, _)| n == "acme")
    };
    assert!(graced());
    assert!(store.session_up("acme", row(8, "0b", 3)).await.is_err());
    assert!(graced(), "no live session in the view");
    assert_eq!(store.view().check(&id("acme"), "0a"), Ok(()), "not retired");
    assert_eq!(store.view().superseded("acme", "0a"), Some(false));
    assert!(store.refresh().await.is_ok());
    assert_eq!(store.view().check(&id("acme"), "0a"), Ok(()));
}

/// Two sessions of one client overlap (a Client moving to a new connection): the newer one
/// holds the row, and its end is refused; the older one then ends and is written. The newer
/// one's end stays to be written: its row goes once the database takes it, where it would
/// otherwise stay until the next start (and the clock's moves skip a client with a row).
#[tokio::test]
async fn p9_an_unwritten_end_of_a_newer_session_outlives_the_older_ones_end() {
    let dir = tempfile::tempdir().unwrap();
    let (store, path) = acme_in_session(&dir).await;
    store.session_up("acme", row(17, "0a", 2)).await.unwrap();
    raw(
        &path,
        "CREATE TRIGGER refuse BEFORE DELETE ON sessions WHEN OLD.session_id = 17 \
         BEGIN SELECT RAISE(ABORT, 'refused'); END",
    );
    assert!(store.refresh().await.unwrap());
    assert!(store.session_down("acme", 17).await.is_err());
    store.session_down("acme", 7).await.unwrap();
    assert_eq!(stored_of(&path, "acme").1, vec![17]);
    raw(&path, "DROP TRIGGER refuse");
    assert!(store.refresh().await.unwrap());
    assert_eq!(stored_of(&path, "acme").1, Vec::<i64>::new());
}

/// A stop's revoke is checked against its serial with the revocation, in the owner: a
/// replacement enrolled after the session's own check (a blue/green swap: the old container's
/// `Goodbye{revoke}` races the new one's enrolment) retired that serial, and the stop revokes
/// nothing. It used to revoke the identity that had just replaced it. Records that cannot be
/// read revoke nothing either (the view cannot tell); the newest serial's stop revokes.
#[tokio::test]
async fn p9_a_stop_of_a_replaced_serial_does_not_revoke_its_replacement() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let store = with_acme(&path).await;
    let acme = id("acme");
    // The replacement's enrolment lands first: serial 0a retires.
    store
        .record_enrolment(grant("acme"), acme.clone(), "0b".into(), 1000, 2)
        .await
        .unwrap();
    let stop = |serial: &'static str| {
        let (store, acme) = (store.clone(), acme.clone());
        async move {
            store
                .revoke_at_stop("acme", &acme, serial, "stopped by the customer", 3, false)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        stop("0a").await,
        StopRevoke::Replaced,
        "the replaced serial's stop revokes nothing"
    );
    assert_eq!(store.view().revocation("acme"), None);
    // Records that cannot be read: whether the serial was replaced is unknown, nothing done
    // (the session keeps the Client's revoke pending).
    rename_table(&path, "serials", "gone");
    assert!(store.refresh().await.is_err());
    assert_eq!(stop("0b").await, StopRevoke::CannotTell);
    rename_table(&path, "gone", "serials");
    assert!(store.refresh().await.unwrap());
    assert_eq!(store.view().revocation("acme"), None);
    assert_eq!(
        stop("0b").await,
        StopRevoke::Revoked(true),
        "the newest serial's stop revokes"
    );
    assert_eq!(
        store.view().revocation("acme").as_deref(),
        Some("stopped by the customer")
    );
    assert_eq!(
        stop("0b").await,
        StopRevoke::Revoked(false),
        "revoked already"
    );
}

/// The view keeps a client's most recent retired serials only (and those whose certificates
/// have not ended): an old container's draining session may stop after its replacement renewed
/// many times, its serial then unknown to a reloaded view. Its stop revokes nothing: the
/// records say it was replaced.
#[tokio::test]
async fn p9_a_stop_of_a_serial_the_view_has_let_go_still_does_not_revoke_its_replacement() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let store = with_acme(&path).await;
    let acme = id("acme");
    for n in 1..=9 {
        let serial = format!("1{n}");
        store
            .record_enrolment(
                grant("acme"),
                acme.clone(),
                serial.as_str().into(),
                1000,
                1 + n,
            )
            .await
            .unwrap();
    }
    // Another process writes: the view is read again, without 0a (nine newer serials retired
    // after it, its certificate ended at 1000).
    raw(
        &path,
        "UPDATE clients SET last_seen = 5 WHERE name = 'acme'",
    );
    assert!(store.refresh().await.unwrap());
    assert_eq!(
        store.view().status(&acme, "0a"),
        Some(SerialStatus::Unknown),
        "the view let it go"
    );
    assert_eq!(
        store
            .revoke_at_stop("acme", &acme, "0a", "stopped by the customer", 20, false)
            .await
            .unwrap(),
        StopRevoke::Replaced
    );
    assert_eq!(store.view().revocation("acme"), None);
}

/// Where each client not revoked had its last session from is handed to the next Hub at its
/// start (its admission keeps those hosts a way in), whether the session ended in order (a
/// restart) or was cut (a crash); a revoked client's is not, and a peer that does not parse
/// (an edited database) is passed over.
#[tokio::test]
async fn p14_the_next_start_learns_where_its_clients_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    {
        let store = with_acme(&path).await;
        let mut up = row(7, "0a", 2);
        up.peer = "192.0.2.7:4433".into();
        store.session_up("acme", up).await.unwrap();
        // Ended in order, as a Hub's stop ends its sessions.
        store.session_down("acme", 7).await.unwrap();
        for (name, serial, peer) in [("beta", "0c", "192.0.2.8:4433"), ("gamma", "0d", "p")] {
            store
                .record_enrolment(grant(name), id(name), serial.into(), 1000, 2)
                .await
                .unwrap();
            let mut up = row(8, serial, 2);
            up.peer = peer.into();
            store.session_up(name, up).await.unwrap();
        }
        store
            .revoke("beta", "ended", 3, false, Revoker::Hub)
            .await
            .unwrap();
        assert!(
            store.peers_before_start().is_empty(),
            "none before this start"
        );
    }
    let (store, _changes) = Store::open(&path, 4).await.unwrap();
    assert_eq!(
        store.peers_before_start(),
        vec![IpAddr::from([192, 0, 2, 7])]
    );
}

/// The index the view's reads search is built by the Hub's start, never by the open every
/// `ewii-hub` command makes: on a large table the build holds the write lock for a while.
#[tokio::test]
async fn the_hub_start_builds_the_serials_index_and_a_commands_open_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let built = || {
        rusqlite::Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'index' AND name = 'serials_by_state')",
                [],
                |r| r.get::<_, bool>(0),
            )
            .unwrap()
    };
    drop(Db::open(&path).unwrap());
    assert!(!built(), "a command's open builds nothing");
    let (_store, _changes) = Store::open(&path, 1).await.unwrap();
    assert!(built(), "the Hub's start builds it");
}

/// A certificate kept for a renewal is cleared a day after it ended
/// ([`Store::forget_ended_certificates`]); one not ended, or ended less than a day ago, stays.
/// A renewal asked again for a serial whose renewal's certificate was cleared is refused as
/// renewed already, not sent again with an empty certificate.
#[tokio::test]
async fn p8_an_ended_renewal_is_not_sent_again_once_its_certificate_is_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let store = with_acme(&path).await;
    let acme = id("acme");
    let now = crate::now_timestamp().unix_secs() as i64;
    let ended = acme_renewal();
    let recent = RenewalRow {
        from: "0b".into(),
        serial: "0d".into(),
        key_sha256: b"key-0d".to_vec(),
        der: b"cert-0d".to_vec(),
        not_after: now - CERTIFICATE_KEPT_SECS + 600,
        ..acme_renewal()
    };
    for row in [ended.clone(), recent.clone()] {
        assert_eq!(
            store.record_renewal(row, &acme, 2).await.unwrap(),
            Ok(Renewal::Fresh)
        );
    }
    assert_eq!(
        store.may_renew("acme", &acme, "0a", b"key-1").await,
        Ok(Renewal::Again(ended))
    );
    assert!(
        !store.forget_ended_certificates().await.unwrap(),
        "less than a batch"
    );
    assert_eq!(
        store.may_renew("acme", &acme, "0a", b"key-1").await,
        Err(RenewalRefusal::AlreadyRenewed {
            serial: "0a".into(),
            to: "0b".into()
        })
    );
    let db = Db::open(&path).unwrap();
    assert_eq!(db.renewal_of("0b").unwrap().unwrap().der, recent.der);
}

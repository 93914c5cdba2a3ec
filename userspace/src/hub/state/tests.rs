use super::*;

/// Due by `now`, with retries set at most 10 s ahead.
fn by(now: i64) -> DueBy {
    DueBy {
        now_ms: now,
        latest_ms: now + 10_000,
    }
}

fn last_seen(db: &Db, name: &str) -> Option<i64> {
    db.snapshot()
        .unwrap()
        .clients
        .into_iter()
        .find(|c| c.name == name)
        .and_then(|c| c.last_seen)
}

#[test]
fn tokens_work_once_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("hub.db")).unwrap();
    db.add_token("t1", "acme", 100, None, 0).unwrap();
    db.add_token("t2", "acme", 100, Some("https://x"), 0)
        .unwrap();
    assert_eq!(
        db.redeem_token("t1", 50).unwrap(),
        Ok(TokenGrant {
            client: "acme".into(),
            webhook: None,
            revocations: 0,
        })
    );
    assert_eq!(
        db.redeem_token("t1", 50).unwrap(),
        Err(TokenRefusal::UnknownOrUsed)
    );
    assert_eq!(
        db.redeem_token("t2", 100).unwrap(),
        Err(TokenRefusal::Expired)
    );
    // Expired tokens are deleted too.
    assert_eq!(
        db.redeem_token("t2", 0).unwrap(),
        Err(TokenRefusal::UnknownOrUsed)
    );
    assert_eq!(
        db.redeem_token("nope", 0).unwrap(),
        Err(TokenRefusal::UnknownOrUsed)
    );
}

/// A new database in `dir` with `acme` enrolled (serial 0a), and acme's SPIFFE ID.
fn with_acme(dir: &tempfile::TempDir) -> (Db, SpiffeId) {
    let db = Db::open(&dir.path().join("hub.db")).unwrap();
    let id = SpiffeId::client("example.org", "acme").unwrap();
    let grant = TokenGrant {
        client: "acme".into(),
        webhook: None,
        revocations: 0,
    };
    db.record_enrolment(&grant, &id, "0a", 1000, 1).unwrap();
    (db, id)
}

#[test]
fn p10_revocation_deletes_outstanding_tokens_and_a_restart_resets_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = with_acme(&dir);
    db.add_token("spare", "acme", 10_000, None, 1).unwrap();
    assert!(db.revoke_client("acme", "test", 2, false).unwrap());
    // A leaked spare token must not quietly undo the revocation.
    assert_eq!(
        db.redeem_token("spare", 3).unwrap(),
        Err(TokenRefusal::UnknownOrUsed)
    );

    let other = SpiffeId::client("example.org", "beta").unwrap();
    let grant_b = TokenGrant {
        client: "beta".into(),
        webhook: None,
        revocations: 0,
    };
    db.record_enrolment(&grant_b, &other, "0b", 1000, 1)
        .unwrap();
    let row = SessionRow {
        session_id: 1,
        serial: "0b".into(),
        peer: "p".into(),
        since: 10,
    };
    db.session_up("beta", &row).unwrap();
    db.session_down("beta", 1, Some(10)).unwrap();
    assert_eq!(last_seen(&db, "beta"), Some(10));
    // The Hub was down until 500: nobody could reach it, so the grace starts again — but not
    // for a revoked client.
    db.restart_grace(500).unwrap();
    assert_eq!(last_seen(&db, "beta"), Some(500));
    assert_eq!(last_seen(&db, "acme"), None);
    // The Hub's clock was set back 100 s: the grace follows, for the same clients.
    db.shift_grace(-100).unwrap();
    assert_eq!(last_seen(&db, "beta"), Some(400));
    assert_eq!(last_seen(&db, "acme"), None);
}

#[test]
fn serial_check_follows_enrolment_and_revocation_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let id = SpiffeId::client("example.org", "acme").unwrap();
    let grant = TokenGrant {
        client: "acme".into(),
        webhook: None,
        revocations: 0,
    };
    {
        let db = Db::open(&path).unwrap();
        db.record_enrolment(&grant, &id, "0a", 1000, 1).unwrap();
        assert_eq!(db.check(&id, "0a"), Ok(()));
        assert_eq!(
            db.check(&id, "0b"),
            Err(SerialRefusal::Unknown {
                serial: "0b".into()
            })
        );
        let other = SpiffeId::client("example.org", "other").unwrap();
        assert_eq!(
            db.check(&other, "0a"),
            Err(SerialRefusal::OtherIdentity {
                serial: "0a".into(),
                owner: id.to_string(),
                id: other.to_string()
            })
        );
        db.record_enrolment(&grant, &id, "0c", 1000, 2).unwrap();
        assert_eq!(
            db.check(&id, "0a"),
            Err(SerialRefusal::Retired {
                serial: "0a".into(),
                id: id.to_string()
            })
        );
        assert!(db.revoke_client("acme", "test", 3, true).unwrap());
        assert!(!db.revoke_client("acme", "again", 4, true).unwrap(), "once");
        assert!(!db.revoke_client("nobody", "test", 3, true).unwrap());
    }
    let db = Db::open(&path).unwrap();
    assert_eq!(
        db.check(&id, "0c"),
        Err(SerialRefusal::Revoked { id: id.to_string() })
    );
    let rows = db.clients().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].revoked_at, Some(3));
    assert_eq!(rows[0].serials, vec![("0c".to_string(), 1000)]);
    let snap = db.snapshot().unwrap();
    assert_eq!(snap.clients[0].revoked.as_deref(), Some("test"));
    let orders: Vec<(String, bool)> = {
        let mut s = snap.serials.clone();
        s.sort_by_key(|s| s.order);
        s.into_iter().map(|s| (s.serial, s.retired)).collect()
    };
    assert_eq!(orders, vec![("0a".into(), true), ("0c".into(), false)]);
}

#[test]
fn the_outbox_tells_when_its_next_row_is_due() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("hub.db")).unwrap();
    assert_eq!(db.next_webhook_due(3, by(-1)).unwrap(), None);
    let id = SpiffeId::client("example.org", "acme").unwrap();
    let grant = TokenGrant {
        client: "acme".into(),
        webhook: Some("https://example.org/hook".into()),
        revocations: 0,
    };
    db.record_enrolment(&grant, &id, "0a", 1000, 1).unwrap();
    assert!(db.revoke_client("acme", "test", 2, true).unwrap());
    assert_eq!(db.next_webhook_due(3, by(-1)).unwrap(), Some(0));
    let due = db.due_webhooks(by(0), 3, &[]).unwrap();
    assert_eq!(due.len(), 1);
    // Due by now: not the next due after now (the caller has it, or takes it when it can).
    assert_eq!(db.next_webhook_due(3, by(0)).unwrap(), None);
    // An attempt in flight is not due again.
    let flying = [due[0].id.clone()];
    assert!(db.due_webhooks(by(0), 3, &flying).unwrap().is_empty());
    db.webhook_failed(&due[0].id, "HTTP 500", 5_000).unwrap();
    assert_eq!(db.next_webhook_due(3, by(0)).unwrap(), Some(5_000));
    assert!(db.due_webhooks(by(4_999), 3, &[]).unwrap().is_empty());
    // The Hub's clock was set back an hour after the retry was set: a retry is never set more
    // than 10 s ahead, so it is due at once, not an hour later; and not next due after it.
    let stepped_back = by(5_000 - 3_600_000);
    assert_eq!(db.due_webhooks(stepped_back, 3, &[]).unwrap().len(), 1);
    assert_eq!(db.next_webhook_due(3, stepped_back).unwrap(), None);
    // Given up after the last attempt: nothing is due any more.
    db.webhook_failed(&due[0].id, "HTTP 500", 6_000).unwrap();
    db.webhook_failed(&due[0].id, "HTTP 500", 7_000).unwrap();
    assert_eq!(db.next_webhook_due(3, by(-1)).unwrap(), None);
    // A parked row is not due by the step-back rule: it waits for the next start.
    db.webhook_parked(&due[0].id, "refused").unwrap();
    assert!(db.due_webhooks(stepped_back, 10, &[]).unwrap().is_empty());
    assert_eq!(db.next_webhook_due(10, stepped_back).unwrap(), None);
    assert_eq!(db.unpark_webhooks().unwrap(), 1);
    assert_eq!(db.due_webhooks(by(0), 10, &[]).unwrap().len(), 1);
}

/// Due rows come in turns by URL, at most `DUE_PER_URL` of one: a customer with many notices
/// waiting (a fleet revoked at once) does not fill the list before another customer's first.
#[test]
fn due_webhooks_take_turns_by_url() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("hub.db")).unwrap();
    let revoke = |name: &str, url: &str, at: i64| {
        let id = SpiffeId::client("example.org", name).unwrap();
        let grant = TokenGrant {
            client: name.into(),
            webhook: Some(url.into()),
            revocations: 0,
        };
        db.record_enrolment(&grant, &id, &format!("0{name}"), 1000, 1)
            .unwrap();
        assert!(db.revoke_client(name, "test", at, true).unwrap());
    };
    for n in 0..10 {
        revoke(&format!("big{n}"), "https://big.example/hook", 10 + n);
    }
    revoke("small", "https://small.example/hook", 100);
    let due = db.due_webhooks(by(1_000_000), 30, &[]).unwrap();
    let urls: Vec<&str> = due.iter().map(|w| w.url.as_str()).collect();
    assert_eq!(
        urls,
        [
            "https://big.example/hook",
            "https://small.example/hook",
            "https://big.example/hook",
            "https://big.example/hook",
            "https://big.example/hook",
        ]
    );
    // The oldest of the big one's first; with it in flight, the next four.
    let flying = [due[0].id.clone()];
    let next = db.due_webhooks(by(1_000_000), 30, &flying).unwrap();
    assert_eq!(next.len(), 5);
    assert!(next.iter().all(|w| w.id != due[0].id));
}

#[test]
fn statements_are_counted_per_thread() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("hub.db")).unwrap();
    let before = statements_on_this_thread();
    db.meta("x").unwrap();
    assert_eq!(statements_on_this_thread() - before, 1);
    let id = SpiffeId::client("example.org", "acme").unwrap();
    let grant = TokenGrant {
        client: "acme".into(),
        webhook: None,
        revocations: 0,
    };
    let before = statements_on_this_thread();
    db.record_enrolment(&grant, &id, "0a", 1000, 1).unwrap();
    // BEGIN, the revocation count, three writes, COMMIT.
    assert_eq!(statements_on_this_thread() - before, 6);
    let other = std::thread::spawn(statements_on_this_thread)
        .join()
        .unwrap();
    assert_eq!(other, 0);
}

/// Issue 9 §6: a revocation that lands between a token's redemption and the enrolment record
/// is not undone by the enrolment (which is refused); one made before the redemption is the
/// one a re-enrolment token is meant to clear.
#[test]
fn p10_a_revocation_between_redemption_and_record_is_not_undone_by_the_enrolment() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("hub.db")).unwrap();
    let id = SpiffeId::client("example.org", "acme").unwrap();
    db.add_token("first", "acme", 100, None, 0).unwrap();
    let grant = db.redeem_token("first", 1).unwrap().unwrap();
    db.record_enrolment(&grant, &id, "0a", 1000, 1).unwrap();

    // Revoked, then a new token to let it back in: the re-enrolment clears that revocation.
    assert!(db
        .revoke_client("acme", "contract ended", 2, false)
        .unwrap());
    db.add_token("again", "acme", 100, None, 3).unwrap();
    let grant = db.redeem_token("again", 4).unwrap().unwrap();
    db.record_enrolment(&grant, &id, "0b", 1000, 4).unwrap();
    let row = || {
        db.clients()
            .unwrap()
            .into_iter()
            .find(|c| c.name == "acme")
            .unwrap()
    };
    assert_eq!(row().revoked_at, None);

    // Redeemed, then revoked before the record: the enrolment is refused, the revocation
    // stays, and no serial is recorded for it.
    db.add_token("raced", "acme", 100, None, 5).unwrap();
    let grant = db.redeem_token("raced", 6).unwrap().unwrap();
    assert!(db
        .revoke_client("acme", "changed my mind", 7, false)
        .unwrap());
    let refused = db.record_enrolment(&grant, &id, "0c", 1000, 8);
    assert!(
        matches!(refused, Err(StateError::RevokedMeanwhile(ref c)) if c == "acme"),
        "{refused:?}"
    );
    assert_eq!(row().revoked_at, Some(7));
    assert_eq!(row().revoke_reason.as_deref(), Some("changed my mind"));
    assert!(!row().serials.iter().any(|(s, _)| s == "0c"));

    // The same when it was revoked already and is revoked again while a token is redeemed.
    db.add_token("late", "acme", 100, None, 9).unwrap();
    let grant = db.redeem_token("late", 10).unwrap().unwrap();
    assert!(!db.revoke_client("acme", "still no", 11, false).unwrap());
    assert!(db.record_enrolment(&grant, &id, "0d", 1000, 12).is_err());
    assert!(row().revoked_at.is_some());
}

/// A database made before the `revocations` and `last_peer` columns existed opens, and gains
/// them: `last_peer` from the sessions the older Hub left recorded.
#[test]
fn an_older_database_is_migrated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE clients (name TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, enrolled_at INTEGER NOT NULL, webhook TEXT, revoked_at INTEGER, revoke_reason TEXT, last_seen INTEGER);
             INSERT INTO clients (name, spiffe_id, enrolled_at) VALUES ('acme', 'spiffe://example.org/client/acme', 1);
             INSERT INTO clients (name, spiffe_id, enrolled_at) VALUES ('beta', 'spiffe://example.org/client/beta', 1);
             CREATE TABLE sessions (client TEXT PRIMARY KEY, session_id INTEGER NOT NULL, serial TEXT NOT NULL, peer TEXT NOT NULL, since INTEGER NOT NULL);
             INSERT INTO sessions VALUES ('beta', 7, '0b', '192.0.2.8:4433', 1);",
        )
        .unwrap();
    }
    let db = Db::open(&path).unwrap();
    assert_eq!(db.last_peers().unwrap(), vec!["192.0.2.8:4433".to_string()]);
    assert!(db.revoke_client("acme", "r", 2, false).unwrap());
    db.add_token("t", "acme", 100, None, 3).unwrap();
    assert_eq!(db.redeem_token("t", 4).unwrap().unwrap().revocations, 1);
    // Opened again: nothing left to add, the peer kept.
    drop(db);
    let again = Db::open(&path).unwrap();
    assert_eq!(
        again.last_peers().unwrap(),
        vec!["192.0.2.8:4433".to_string()]
    );
}

#[test]
fn the_operators_commands_are_logged_in_their_transaction_and_read_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("hub.db")).unwrap();
    db.add_token("t1", "acme", 100, Some("https://x"), 7)
        .unwrap();
    let id = SpiffeId::client("example.org", "acme").unwrap();
    let grant = TokenGrant {
        client: "acme".into(),
        webhook: None,
        revocations: 0,
    };
    db.record_enrolment(&grant, &id, "0a", 1000, 8).unwrap();
    // The Hub's own revocations are audited where it makes them: not logged.
    assert!(db.revoke_client("acme", "stopped", 9, false).unwrap());
    db.readmit("acme").unwrap();
    assert!(db.revoke_by_operator("acme", "ended", 10).unwrap().0);
    // Revoked already: nothing changed, nothing logged.
    assert!(!db.revoke_by_operator("acme", "again", 11).unwrap().0);
    let entries = db.operator_log_after(0).unwrap();
    let actions: Vec<(i64, &str, &OperatorAction)> = entries
        .iter()
        .map(|e| (e.at, e.client.as_str(), &e.action))
        .collect();
    assert_eq!(
        actions,
        vec![
            (
                7,
                "acme",
                &OperatorAction::TokenCreated {
                    id: token_id_of("t1"),
                    expires_at: 100,
                    webhook: Some("https://x".into()),
                }
            ),
            (
                10,
                "acme",
                &OperatorAction::Revoked {
                    reason: "ended".into(),
                    spiffe_id: Some(id.to_string()),
                }
            ),
        ]
    );
    assert!(entries[0].id < entries[1].id);
    assert_eq!(db.operator_log_after(entries[0].id).unwrap().len(), 1);
    assert!(db.operator_log_after(entries[1].id).unwrap().is_empty());
    // Audited up to the first: the mark moves, that entry goes, the next stays.
    db.operator_log_audited(entries[0].id).unwrap();
    assert_eq!(
        db.meta(operator_log::AUDITED_UP_TO).unwrap(),
        Some(entries[0].id)
    );
    assert_eq!(db.operator_log_after(0).unwrap(), entries[1..].to_vec());
}

#[test]
fn p10_a_revocation_by_the_operator_or_the_hub_deletes_unused_tokens_and_a_stop_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("hub.db")).unwrap();
    let grant = |client: &str| TokenGrant {
        client: client.into(),
        webhook: None,
        revocations: 0,
    };
    for name in ["acme", "beta", "gamma"] {
        let id = SpiffeId::client("example.org", name).unwrap();
        db.record_enrolment(&grant(name), &id, &format!("{name}-0"), 1000, 1)
            .unwrap();
        db.add_token(&format!("{name}-next"), name, 100, None, 2)
            .unwrap();
    }
    let unused = |name: &str| {
        db.tokens()
            .unwrap()
            .iter()
            .filter(|t| t.client == name)
            .count()
    };
    // The customer's stop: the token the operator gave for the replacement stays.
    let stop = Revoker::Customer { notify: true };
    assert!(
        db.revoke_client_noting("acme", "stopped", 3, true, stop)
            .unwrap()
            .0
    );
    assert_eq!(unused("acme"), 1);
    // The Hub's own (the silent-client grace) and an operator's: none left to undo them.
    assert!(db.revoke_client("beta", "silent", 3, true).unwrap());
    assert_eq!(unused("beta"), 0);
    assert!(db.revoke_by_operator("gamma", "ended", 3).unwrap().0);
    assert_eq!(unused("gamma"), 0);
    // The kept token enrols the stopped client again.
    assert_eq!(
        db.redeem_token("acme-next", 4).unwrap().unwrap().client,
        "acme"
    );
}

#[test]
fn p9_a_clock_move_shifts_silent_clients_only_and_readmission_or_enrolment_forgets_silence() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("hub.db")).unwrap();
    let enrol = |name: &str, serial: &str| {
        let grant = TokenGrant {
            client: name.into(),
            webhook: None,
            revocations: 0,
        };
        let id = SpiffeId::client("example.org", name).unwrap();
        db.record_enrolment(&grant, &id, serial, 1000, 1).unwrap();
    };
    let up = |name: &str, id: u64, serial: &str, since: i64| {
        let row = SessionRow {
            session_id: id,
            serial: serial.into(),
            peer: "p".into(),
            since,
        };
        db.session_up(name, &row).unwrap();
    };
    enrol("acme", "0a");
    enrol("beta", "0b");
    up("acme", 1, "0a", 10);
    up("beta", 2, "0b", 10);
    db.session_down("beta", 2, Some(20)).unwrap();
    // acme is connected: its `last_seen` is its session's start, not a grace.
    db.shift_grace(100).unwrap();
    assert_eq!(last_seen(&db, "acme"), Some(10));
    assert_eq!(last_seen(&db, "beta"), Some(120));
    // Revoked (by the grace, say): no grace left to move.
    assert!(db.revoke_client("beta", "grace", 130, false).unwrap());
    db.shift_grace(5).unwrap();
    assert_eq!(last_seen(&db, "beta"), Some(120));
    // Readmitted: its silence before is forgotten, else the running Hub's grace would revoke
    // it again at once; the grace starts at its next session.
    assert!(db.readmit("beta").unwrap());
    assert_eq!(last_seen(&db, "beta"), None);
    // So does a new enrolment of a client seen before.
    db.session_down("acme", 1, Some(50)).unwrap();
    assert_eq!(last_seen(&db, "acme"), Some(50));
    enrol("acme", "0c");
    assert_eq!(last_seen(&db, "acme"), None);
}

/// A session's record and the retirement of its client's older serials (P8) are one write:
/// when the retirement cannot be written, neither is the session (no row, its serial unused,
/// the client's `last_seen` as it was), and the Hub refuses the session; when it can, both.
#[test]
fn p8_a_session_is_recorded_with_its_older_serials_retirement_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let (db, id) = with_acme(&dir);
    let renewal = RenewalRow {
        serial: "0b".into(),
        from: "0a".into(),
        client: "acme".into(),
        not_after: 1000,
        key_sha256: b"key-1".to_vec(),
        der: Vec::new(),
    };
    db.record_renewal(&renewal, 2).unwrap();
    let row = SessionRow {
        session_id: 7,
        serial: "0b".into(),
        peer: "p".into(),
        since: 10,
    };
    let sessions = |db: &Db| -> i64 {
        db.with(|c| c.query_row("SELECT COUNT(*) FROM sessions", [], |r| r.get(0)))
            .unwrap()
    };
    db.with(|c| {
        c.execute_batch(
            "CREATE TRIGGER refuse BEFORE UPDATE OF retired ON serials \
             BEGIN SELECT RAISE(ABORT, 'disk full'); END",
        )
    })
    .unwrap();
    assert!(db.session_up("acme", &row).is_err());
    assert_eq!(sessions(&db), 0, "no session on record");
    assert_eq!(last_seen(&db, "acme"), None);
    assert_eq!(db.check(&id, "0a"), Ok(()), "not retired");
    assert!(!db.superseded("acme", "0a").unwrap(), "0b not in use");
    db.with(|c| c.execute_batch("DROP TRIGGER refuse")).unwrap();
    db.session_up("acme", &row).unwrap();
    assert_eq!(sessions(&db), 1);
    assert_eq!(last_seen(&db, "acme"), Some(10));
    assert!(matches!(
        db.check(&id, "0a"),
        Err(SerialRefusal::Retired { .. })
    ));
}

/// A token redeemed for a `[[federation]]` client's name does not enrol: the enrolment would
/// take the name, its routes and its revocation over (a revoked federated client stays revoked).
#[test]
fn p7_a_token_for_a_federated_clients_name_enrols_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("hub.db")).unwrap();
    let federated: SpiffeId = "spiffe://customer.example/ewii/acme".parse().unwrap();
    db.admit_federated("acme", &federated, None, 1).unwrap();
    assert!(db.revoke_client("acme", "left", 2, false).unwrap());
    // A token made for the name (before its Hub recorded the federation, or by hand).
    db.add_token("t", "acme", 100, None, 3).unwrap();
    let grant = db.redeem_token("t", 4).unwrap().unwrap();
    let id: SpiffeId = "spiffe://example.org/client/acme".parse().unwrap();
    let refused = db.record_enrolment(&grant, &id, "0a", 1000, 5);
    assert!(
        matches!(&refused, Err(StateError::NotTokenEnrolled { client, holder })
            if client == "acme" && *holder == federated.to_string()),
        "{refused:?}"
    );
    let row = client_row(&db, "acme");
    assert_eq!(row.spiffe_id, federated.to_string());
    assert_eq!(row.revoked_at, Some(2), "still revoked");
    assert!(row.serials.is_empty(), "{:?}", row.serials);
}

/// A Client's own stop that lands while its replacement enrols (a blue/green swap: the old
/// container's `Goodbye{revoke}` between the new one's token redeemed and its enrolment
/// recorded) does not refuse that enrolment: its token was the operator's for it, and the
/// stop would not have refused it a moment earlier. It used to be refused as "revoked
/// meanwhile", the token spent.
#[test]
fn p9_a_stop_during_its_replacements_enrolment_does_not_refuse_it() {
    let dir = tempfile::tempdir().unwrap();
    let (db, id) = with_acme(&dir);
    db.add_token("next", "acme", 100, None, 2).unwrap();
    let grant = db.redeem_token("next", 3).unwrap().unwrap();
    let stop = Revoker::Customer { notify: false };
    assert!(
        db.revoke_client_noting("acme", "stopped", 4, false, stop)
            .unwrap()
            .0
    );
    db.record_enrolment(&grant, &id, "0b", 1000, 5).unwrap();
    let row = client_row(&db, "acme");
    assert_eq!(row.revoked_at, None, "enrolled again");
    assert_eq!(row.serials.len(), 1);
    assert_eq!(row.serials[0].0, "0b");
    // An operator's revocation at the same point still refuses it.
    db.add_token("again", "acme", 100, None, 6).unwrap();
    let grant = db.redeem_token("again", 7).unwrap().unwrap();
    assert!(db.revoke_by_operator("acme", "ended", 8).unwrap().0);
    assert!(matches!(
        db.record_enrolment(&grant, &id, "0c", 1000, 9),
        Err(StateError::RevokedMeanwhile(_))
    ));
}

/// `name`'s row, which must be there.
fn client_row(db: &Db, name: &str) -> ClientRow {
    db.clients()
        .unwrap()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap()
}

/// The snapshot the view is built from keeps a client's serials in use, its most recent
/// retired ones and those whose certificates have not ended (the view would otherwise grow by
/// every renewal for the Hub's whole life); the table keeps them all, and still answers
/// `retired` for the oldest.
#[test]
fn p8_the_snapshot_keeps_the_recent_retired_serials_and_the_table_every_one() {
    let dir = tempfile::tempdir().unwrap();
    let (db, id) = with_acme(&dir);
    let grant = TokenGrant {
        client: "acme".into(),
        webhook: None,
        revocations: 0,
    };
    // Each enrolment retires every earlier serial: 0a and s01..s19 retire, s20 is in use.
    for n in 1..=20 {
        db.record_enrolment(&grant, &id, format!("s{n:02}").as_str(), 1000, 1 + n)
            .unwrap();
    }
    let (other, beta) = (
        SpiffeId::client("example.org", "beta").unwrap(),
        TokenGrant {
            client: "beta".into(),
            webhook: None,
            revocations: 0,
        },
    );
    // b0's certificate has not ended: kept, however many retired after it.
    db.record_enrolment(&beta, &other, "b0", 4_000_000_000, 30)
        .unwrap();
    // b11's has not ended either, and it is among the recent ones: read twice, kept once.
    for n in 1..=12 {
        let not_after = if n == 11 { 4_000_000_000 } else { 1000 };
        db.record_enrolment(
            &beta,
            &other,
            format!("b{n:02}").as_str(),
            not_after,
            30 + n,
        )
        .unwrap();
    }
    let mut kept: Vec<(String, bool)> = db
        .snapshot()
        .unwrap()
        .serials
        .into_iter()
        .map(|s| (s.serial, s.retired))
        .collect();
    kept.sort();
    let mut want: Vec<(String, bool)> = (12..=19)
        .map(|n| (format!("s{n:02}"), true))
        .chain([("s20".to_owned(), false)])
        .chain((4..=11).map(|n| (format!("b{n:02}"), true)))
        .chain([("b0".to_owned(), true), ("b12".to_owned(), false)])
        .collect();
    want.sort();
    assert_eq!(kept, want);
    assert_eq!(
        records::RETIRED_KEPT,
        8,
        "the expected list above is written for eight"
    );
    // The table forgets nothing: the oldest is still told retired by its record.
    assert_eq!(
        db.check(&id, "0a"),
        Err(SerialRefusal::Retired {
            serial: "0a".into(),
            id: id.to_string()
        })
    );
}

/// A reload reads the serials it keeps through indexes, not the whole table (which holds every
/// serial ever issued): each of the snapshot's reads searches an index, and none sorts.
#[test]
fn the_snapshot_reads_its_serials_by_index() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = with_acme(&dir);
    // What the Hub's start builds (once: the second finds it).
    db.add_missing_indexes().unwrap();
    db.add_missing_indexes().unwrap();
    for sql in [
        records::SERIALS_IN_USE,
        records::SERIALS_RETIRED_NOT_ENDED,
        records::SERIALS_RETIRED_RECENT,
    ] {
        let plan: Vec<String> = db
            .with(|c| {
                let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                let n = stmt.parameter_count();
                let steps = stmt
                    .query_map(rusqlite::params_from_iter(vec![0i64; n]), |r| r.get(3))?
                    .collect();
                steps
            })
            .unwrap();
        assert!(
            plan.iter()
                .all(|step| step.starts_with("SEARCH serials USING")
                    && !step.contains("TEMP B-TREE")),
            "{sql}: {plan:?}"
        );
    }
}

/// `n` renewals of acme's serials (`f{i}` → `s{i}`, from `start`), each with a certificate of
/// 700 bytes (a real one is 550–750) that ended at `not_after`.
fn renewals(db: &Db, start: usize, n: usize, not_after: i64) {
    for i in start..start + n {
        let row = RenewalRow {
            client: "acme".into(),
            from: format!("f{i}"),
            serial: format!("s{i}"),
            key_sha256: format!("key-{i}").into_bytes(),
            der: vec![0x30; 700],
            not_after,
        };
        db.record_renewal(&row, 1).unwrap();
    }
}

/// The database's size in pages, less the free ones.
fn pages_used(db: &Db) -> i64 {
    db.with(|c| {
        c.query_row(
            "SELECT (SELECT page_count FROM pragma_page_count()) - (SELECT freelist_count FROM pragma_freelist_count())",
            [],
            |r| r.get(0),
        )
    })
    .unwrap()
}

/// The certificates kept for renewals are cleared once they ended (before the time given), in
/// batches of the size asked, by the index of the rows that still hold one; the rows stay. And
/// the space comes back: a database whose ended certificates were cleared takes as many new
/// serials again in far less than the space they took the first time (SQLite merges the pages
/// the shorter rows leave and reuses them), where without the clearing it would double.
#[test]
fn p8_ended_certificates_are_cleared_in_batches_keeping_the_issue_order_and_their_space_is_reused()
{
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = with_acme(&dir);
    db.add_missing_indexes().unwrap();
    let plan: Vec<String> = db
        .with(|c| {
            let mut stmt = c.prepare(
                "EXPLAIN QUERY PLAN SELECT rowid FROM serials WHERE der IS NOT NULL AND not_after < 0",
            )?;
            let steps = stmt.query_map([], |r| r.get(3))?.collect();
            steps
        })
        .unwrap();
    assert!(
        plan.iter()
            .any(|step| step.contains("serials_holding_certificates")),
        "{plan:?}"
    );
    renewals(&db, 0, 4000, 100);
    renewals(&db, 4000, 10, 5000);
    // Two rows edited by hand, ended too: one whose client is not on record (its foreign key
    // would refuse it written again: left as it is), one whose text is not UTF-8 (written
    // back byte for byte).
    db.with(|c| {
        c.execute_batch(
            "PRAGMA foreign_keys = OFF;
             INSERT INTO serials (serial, client, issued_at, not_after, der)
                 VALUES ('orphan', 'gone', 1, 100, x'30');
             PRAGMA foreign_keys = ON;
             INSERT INTO serials (serial, client, issued_at, not_after, renewed_from, der)
                 VALUES ('edited', 'acme', 1, 100, CAST(x'ff00fe' AS TEXT), x'30');",
        )
    })
    .unwrap();
    let rowids = |db: &Db| -> Vec<(String, i64)> {
        db.with(|c| {
            let mut stmt = c.prepare("SELECT serial, rowid FROM serials ORDER BY rowid")?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect();
            rows
        })
        .unwrap()
    };
    let order = rowids(&db);
    let before = pages_used(&db);
    let mut cleared = Vec::new();
    loop {
        let n = db.forget_ended_certificates(1000, 1024).unwrap();
        cleared.push(n);
        if n < 1024 {
            break;
        }
    }
    assert_eq!(cleared, [1024, 1024, 1024, 929]);
    let edited: Vec<(String, String, String, bool)> = db
        .with(|c| {
            let mut stmt = c.prepare(
                "SELECT serial, typeof(renewed_from), hex(renewed_from), der IS NOT NULL
                 FROM serials WHERE serial IN ('orphan', 'edited') ORDER BY serial",
            )?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect();
            rows
        })
        .unwrap();
    let want = [
        ("edited", "text", "FF00FE", false),
        ("orphan", "null", "", true),
    ];
    let want: Vec<_> = want
        .iter()
        .map(|&(s, t, h, d)| (s.to_owned(), t.to_owned(), h.to_owned(), d))
        .collect();
    assert_eq!(edited, want);
    assert_eq!(
        rowids(&db),
        order,
        "each serial keeps its place in the issue order"
    );
    let kept: Vec<(String, bool)> = db
        .with(|c| {
            let mut stmt = c.prepare(
                "SELECT serial, der IS NOT NULL FROM serials WHERE serial IN ('0a', 's0', 's3999', 's4000', 's4009') ORDER BY serial",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect();
            rows
        })
        .unwrap();
    let want = [
        ("0a", false),
        ("s0", false),
        ("s3999", false),
        ("s4000", true),
        ("s4009", true),
    ];
    let want: Vec<(String, bool)> = want.iter().map(|&(s, d)| (s.to_owned(), d)).collect();
    assert_eq!(
        kept, want,
        "every row stays; the certificates not ended are kept"
    );
    assert_eq!(db.renewal_of("f0").unwrap().unwrap().der, Vec::<u8>::new());
    assert_eq!(
        db.renewal_of("f4000").unwrap().unwrap().der,
        vec![0x30; 700]
    );
    renewals(&db, 5000, 4000, 100);
    let after = pages_used(&db);
    assert!(
        after * 2 < before * 3,
        "4,000 more serials took the database from {before} to {after} pages"
    );
}

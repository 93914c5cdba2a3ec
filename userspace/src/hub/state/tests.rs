use super::*;

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
            webhook: None
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

#[test]
fn p10_revocation_deletes_outstanding_tokens_and_a_restart_resets_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("hub.db")).unwrap();
    let id = SpiffeId::client("example.org", "acme").unwrap();
    let grant = TokenGrant {
        client: "acme".into(),
        webhook: None,
    };
    db.record_enrolment(&grant, &id, "0a", 1000, 1).unwrap();
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
    db.session_down("beta", 1, 10).unwrap();
    assert_eq!(last_seen(&db, "beta"), Some(10));
    // The Hub was down until 500: nobody could reach it, so the grace starts again — but not
    // for a revoked client.
    db.restart_grace(500).unwrap();
    assert_eq!(last_seen(&db, "beta"), Some(500));
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
    assert_eq!(db.next_webhook_due(3).unwrap(), None);
    let id = SpiffeId::client("example.org", "acme").unwrap();
    let grant = TokenGrant {
        client: "acme".into(),
        webhook: Some("https://example.org/hook".into()),
    };
    db.record_enrolment(&grant, &id, "0a", 1000, 1).unwrap();
    assert!(db.revoke_client("acme", "test", 2, true).unwrap());
    assert_eq!(db.next_webhook_due(3).unwrap(), Some(0));
    let due = db.due_webhooks(0, 3).unwrap();
    assert_eq!(due.len(), 1);
    db.webhook_failed(&due[0].id, "HTTP 500", 5_000).unwrap();
    assert_eq!(db.next_webhook_due(3).unwrap(), Some(5_000));
    assert!(db.due_webhooks(4_999, 3).unwrap().is_empty());
    // Given up after the last attempt: nothing is due any more.
    db.webhook_failed(&due[0].id, "HTTP 500", 6_000).unwrap();
    db.webhook_failed(&due[0].id, "HTTP 500", 7_000).unwrap();
    assert_eq!(db.next_webhook_due(3).unwrap(), None);
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
    };
    let before = statements_on_this_thread();
    db.record_enrolment(&grant, &id, "0a", 1000, 1).unwrap();
    // BEGIN, three writes, COMMIT.
    assert_eq!(statements_on_this_thread() - before, 5);
    let other = std::thread::spawn(statements_on_this_thread)
        .join()
        .unwrap();
    assert_eq!(other, 0);
}

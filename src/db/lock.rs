//! Session-level advisory locks held on a pooled connection while one
//! replica does work meant for one replica at a time (the inventory's
//! counting pass), released on every exit path.

use deadpool_postgres::Object;

/// A held `pg_try_advisory_lock(key)` on one pooled connection.
///
/// A session lock outlives a transaction, so the connection must never go
/// back to the pool still holding it: [`SessionLock::release`] unlocks and
/// returns the connection; on any other exit (an error, a dropped future
/// at shutdown) the connection is detached from the pool and closed, and
/// the server frees the lock with the session.
pub struct SessionLock {
    client: Option<Object>,
    key: i64,
}

impl SessionLock {
    /// Try to take `key` on `client`. `Ok(None)` when another session holds
    /// it; the connection then goes back to the pool.
    pub async fn try_acquire(
        client: Object,
        key: i64,
    ) -> Result<Option<SessionLock>, tokio_postgres::Error> {
        // The guard exists before the statement: a future dropped while it
        // runs may already hold the lock.
        let mut lock = SessionLock {
            client: Some(client),
            key,
        };
        let got: bool = lock
            .client()
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await?
            .get(0);
        if got {
            Ok(Some(lock))
        } else {
            // Not held by this session: the connection is clean.
            drop(lock.client.take());
            Ok(None)
        }
    }

    pub fn client(&self) -> &Object {
        self.client
            .as_ref()
            .expect("held until released or dropped")
    }

    pub fn client_mut(&mut self) -> &mut Object {
        self.client
            .as_mut()
            .expect("held until released or dropped")
    }

    /// Unlock and hand the connection back to the pool.
    pub async fn release(mut self) -> Result<(), tokio_postgres::Error> {
        let client = self.client.take().expect("held until released");
        match client
            .query_one("SELECT pg_advisory_unlock($1)", &[&self.key])
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                drop(Object::take(client));
                Err(e)
            }
        }
    }
}

impl Drop for SessionLock {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // Closing the connection ends the session and its lock.
            drop(Object::take(client));
        }
    }
}

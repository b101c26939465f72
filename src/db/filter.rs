//! A job's selection as SQL: one builder for the three scopes. Only fixed
//! text and quoted identifiers go into the clause; every value is a bind
//! parameter. Conditions are written with `$?` and numbered when the
//! statement is built, after the statement's own leading parameters.

use tokio_postgres::types::ToSql;

use crate::selection::Common;

type Param = Box<dyn ToSql + Sync + Send>;

/// The `AND ...` conditions of a selection and their parameters.
#[derive(Default)]
pub struct Filter {
    conditions: Vec<(String, Param)>,
}

impl Filter {
    /// Add `sql` (with one `$?` for `value`).
    pub fn push(&mut self, sql: impl Into<String>, value: impl ToSql + Sync + Send + 'static) {
        self.conditions.push((sql.into(), Box::new(value)));
    }

    /// The common selection keys of SPEC §6.1 over the (already quoted)
    /// id column and, when the table has one, the created_at column.
    pub fn common(&mut self, id: &str, created: Option<&str>, c: &Common) {
        if let Some(ids) = &c.ids {
            self.push(format!("{id} = ANY($?::bigint[])"), ids.clone());
        }
        if let Some(v) = c.id_from {
            self.push(format!("{id} >= $?::bigint"), v);
        }
        if let Some(v) = c.id_to {
            self.push(format!("{id} <= $?::bigint"), v);
        }
        if let Some(created) = created {
            if let Some(t) = c.created_before {
                self.push(format!("{created} < $?::timestamptz"), t);
            }
            if let Some(t) = c.created_after {
                self.push(format!("{created} > $?::timestamptz"), t);
            }
        }
    }

    /// ` AND c1 AND c2 ...`, placeholders numbered from `first`.
    pub fn clause(&self, first: usize) -> String {
        self.conditions
            .iter()
            .enumerate()
            .map(|(i, (sql, _))| format!(" AND {}", sql.replace("$?", &format!("${}", first + i))))
            .collect()
    }

    /// The statement's leading parameters, then the conditions' (matching
    /// `clause(leading.len() + 1)`).
    pub fn params<'a>(&'a self, leading: &[&'a (dyn ToSql + Sync)]) -> Vec<&'a (dyn ToSql + Sync)> {
        let mut p: Vec<&(dyn ToSql + Sync)> = leading.to_vec();
        p.extend(
            self.conditions
                .iter()
                .map(|(_, v)| v.as_ref() as &(dyn ToSql + Sync)),
        );
        p
    }
}

#[cfg(test)]
mod tests {
    use super::Filter;

    #[test]
    fn conditions_are_numbered_after_the_leading_parameters() {
        let mut f = Filter::default();
        f.push("a = $?::bigint", 1i64);
        f.push("b = ANY($?::text[])", vec!["x".to_owned()]);
        assert_eq!(f.clause(3), " AND a = $3::bigint AND b = ANY($4::text[])");
        assert_eq!(f.params(&[&0i64, &1i64]).len(), 4);
        assert_eq!(Filter::default().clause(1), "");
    }
}

//! The contract's `Query`: filters, sort and pagination, as DESIGN.md decides.
//! Operators `eq`, `ne`, `gt`, `lt`, `in` (comma-separated), `contains`; an
//! unknown operator or field is INVALID_ARGUMENT. `page` is 1-based,
//! `page_size` 0 = 50.

use std::cmp::Ordering;

use crate::pb::{Pagination, Query};
use tonic::Status;

/// Default and largest page size.
pub const DEFAULT_PAGE_SIZE: i32 = 50;
pub const MAX_PAGE_SIZE: i32 = 1000;

/// A field value of a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Num(f64),
}

impl Value {
    fn as_text(&self) -> String {
        match self {
            Value::Str(s) => s.clone(),
            Value::Num(n) => n.to_string(),
        }
    }

    fn cmp_to(&self, other: &str) -> Option<Ordering> {
        match self {
            Value::Num(n) => other
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(|o| n.partial_cmp(&o)),
            Value::Str(s) => Some(s.to_ascii_lowercase().cmp(&other.to_ascii_lowercase())),
        }
    }

    fn eq_text(&self, other: &str) -> bool {
        self.cmp_to(other) == Some(Ordering::Equal)
    }

    fn order(&self, other: &Value) -> Ordering {
        match (self, other) {
            (Value::Num(a), Value::Num(b)) => a.partial_cmp(b).unwrap_or(Ordering::Equal),
            (a, b) => a.as_text().cmp(&b.as_text()),
        }
    }
}

/// Rows a query can filter and sort.
pub trait Queryable {
    /// The value of a field, `None` if the row lacks it (e.g. an absent
    /// metadata key). Field names outside `fields()` are never asked.
    fn field(&self, name: &str) -> Option<Value>;
}

/// What a query may name: fixed fields, plus `prefix.<key>` for map fields.
pub struct Fields {
    pub names: &'static [&'static str],
    pub map_prefixes: &'static [&'static str],
}

impl Fields {
    fn check(&self, name: &str, what: &str) -> Result<(), Status> {
        let ok = self.names.contains(&name)
            || self.map_prefixes.iter().any(|p| {
                name.strip_prefix(p)
                    .is_some_and(|k| k.starts_with('.') && k.len() > 1)
            });
        if ok {
            Ok(())
        } else {
            let mut known: Vec<String> = self.names.iter().map(|s| s.to_string()).collect();
            known.extend(self.map_prefixes.iter().map(|p| format!("{p}.<key>")));
            Err(Status::invalid_argument(format!(
                "query.{what}: unknown field {name:?} (known: {})",
                known.join(", ")
            )))
        }
    }
}

fn matches(row: &impl Queryable, field: &str, op: &str, value: &str) -> Result<bool, Status> {
    let got = row.field(field);
    Ok(match op {
        "eq" => got.is_some_and(|g| g.eq_text(value)),
        "ne" => !got.is_some_and(|g| g.eq_text(value)),
        "gt" => got.and_then(|g| g.cmp_to(value)) == Some(Ordering::Greater),
        "lt" => got.and_then(|g| g.cmp_to(value)) == Some(Ordering::Less),
        "in" => got.is_some_and(|g| value.split(',').any(|v| g.eq_text(v.trim()))),
        "contains" => got.is_some_and(|g| {
            g.as_text()
                .to_ascii_lowercase()
                .contains(&value.to_ascii_lowercase())
        }),
        other => {
            return Err(Status::invalid_argument(format!(
                "query.filters: unknown operator {other:?} (eq, ne, gt, lt, in, contains)"
            )))
        }
    })
}

/// Filters, sorts and pages `rows`. Returns the page and its `Pagination`
/// (with `total_items` counted after filtering).
pub fn apply<T: Queryable>(
    mut rows: Vec<T>,
    query: Option<&Query>,
    fields: &Fields,
) -> Result<(Vec<T>, Pagination), Status> {
    let default = Query::default();
    let q = query.unwrap_or(&default);
    for f in &q.filters {
        fields.check(&f.field, "filters")?;
        if !matches!(
            f.operator.as_str(),
            "eq" | "ne" | "gt" | "lt" | "in" | "contains"
        ) {
            return Err(Status::invalid_argument(format!(
                "query.filters: unknown operator {:?} on field {:?} (eq, ne, gt, lt, in, contains)",
                f.operator, f.field
            )));
        }
    }
    let mut kept = Vec::with_capacity(rows.len());
    for row in rows.drain(..) {
        let mut keep = true;
        for f in &q.filters {
            if !matches(&row, &f.field, &f.operator, &f.value)? {
                keep = false;
                break;
            }
        }
        if keep {
            kept.push(row);
        }
    }
    if !q.sort_by.is_empty() {
        fields.check(&q.sort_by, "sort_by")?;
        kept.sort_by(|a, b| {
            let (va, vb) = (a.field(&q.sort_by), b.field(&q.sort_by));
            let o = match (va, vb) {
                (Some(a), Some(b)) => a.order(&b),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            };
            if q.sort_desc {
                o.reverse()
            } else {
                o
            }
        });
    }
    let p = q.pagination.unwrap_or_default();
    if p.page < 0 || p.page_size < 0 || p.page_size > MAX_PAGE_SIZE {
        return Err(Status::invalid_argument(format!(
            "query.pagination: page {} and page_size {} must be 0 or more, page_size at most {MAX_PAGE_SIZE}",
            p.page, p.page_size
        )));
    }
    let page = p.page.max(1);
    let size = if p.page_size == 0 {
        DEFAULT_PAGE_SIZE
    } else {
        p.page_size
    };
    let total = kept.len();
    let total_pages = total.div_ceil(size as usize);
    let start = (page as usize - 1).saturating_mul(size as usize);
    let rows: Vec<T> = kept.into_iter().skip(start).take(size as usize).collect();
    Ok((
        rows,
        Pagination {
            page,
            page_size: size,
            total_items: i32::try_from(total).unwrap_or(i32::MAX),
            total_pages: i32::try_from(total_pages).unwrap_or(i32::MAX),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::Filter;

    #[derive(Debug)]
    struct Row(&'static str, f64);
    impl Queryable for Row {
        fn field(&self, name: &str) -> Option<Value> {
            match name {
                "name" => Some(Value::Str(self.0.into())),
                "n" => Some(Value::Num(self.1)),
                _ => None,
            }
        }
    }
    const FIELDS: Fields = Fields {
        names: &["name", "n"],
        map_prefixes: &["meta"],
    };

    fn rows() -> Vec<Row> {
        vec![
            Row("alb-1", 5.0),
            Row("alb-2", 10.0),
            Row("dblb-1", 1.0),
            Row("ALB-3", 7.0),
        ]
    }

    fn q(filters: &[(&str, &str, &str)], sort: &str, desc: bool, page: i32, size: i32) -> Query {
        Query {
            filters: filters
                .iter()
                .map(|(f, o, v)| Filter {
                    field: f.to_string(),
                    operator: o.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            sort_by: sort.into(),
            sort_desc: desc,
            pagination: Some(Pagination {
                page,
                page_size: size,
                ..Default::default()
            }),
        }
    }

    fn names(r: &[Row]) -> Vec<&str> {
        r.iter().map(|r| r.0).collect()
    }

    #[test]
    fn every_operator_filters() {
        let run = |f: &[(&str, &str, &str)]| {
            names(
                &apply(rows(), Some(&q(f, "n", false, 0, 0)), &FIELDS)
                    .unwrap()
                    .0,
            )
            .join(" ")
        };
        assert_eq!(run(&[("name", "contains", "alb")]), "alb-1 ALB-3 alb-2");
        assert_eq!(
            run(&[("name", "contains", "LB-")]),
            "dblb-1 alb-1 ALB-3 alb-2"
        );
        assert_eq!(run(&[("name", "eq", "alb-3")]), "ALB-3");
        assert_eq!(run(&[("name", "ne", "alb-1")]), "dblb-1 ALB-3 alb-2");
        assert_eq!(run(&[("n", "gt", "5")]), "ALB-3 alb-2");
        assert_eq!(run(&[("n", "lt", "5")]), "dblb-1");
        assert_eq!(run(&[("name", "in", "alb-1, dblb-1")]), "dblb-1 alb-1");
        assert_eq!(
            run(&[("name", "contains", "alb"), ("n", "gt", "6")]),
            "ALB-3 alb-2"
        );
    }

    #[test]
    fn sorts_and_pages() {
        let (page, p) = apply(rows(), Some(&q(&[], "n", true, 2, 3)), &FIELDS).unwrap();
        assert_eq!(names(&page), vec!["dblb-1"]);
        assert_eq!(
            (p.page, p.page_size, p.total_items, p.total_pages),
            (2, 3, 4, 2)
        );
        let (page, p) = apply(rows(), None, &FIELDS).unwrap();
        assert_eq!(page.len(), 4);
        assert_eq!(p.page_size, DEFAULT_PAGE_SIZE);
        let (page, _) = apply(rows(), Some(&q(&[], "", false, 9, 2)), &FIELDS).unwrap();
        assert!(page.is_empty());
    }

    #[test]
    fn unknown_fields_and_operators_are_invalid() {
        let e = apply(
            rows(),
            Some(&q(&[("colour", "eq", "x")], "", false, 0, 0)),
            &FIELDS,
        )
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("unknown field \"colour\""),
            "{}",
            e.message()
        );
        let e = apply(
            rows(),
            Some(&q(&[("name", "like", "x")], "", false, 0, 0)),
            &FIELDS,
        )
        .unwrap_err();
        assert!(
            e.message().contains("unknown operator \"like\""),
            "{}",
            e.message()
        );
        let e = apply(rows(), Some(&q(&[], "bogus", false, 0, 0)), &FIELDS).unwrap_err();
        assert!(e.message().contains("query.sort_by"), "{}", e.message());
        assert!(apply(
            rows(),
            Some(&q(&[("meta.zone", "eq", "a")], "", false, 0, 0)),
            &FIELDS
        )
        .is_ok());
        let e = apply(rows(), Some(&q(&[], "", false, -1, 0)), &FIELDS).unwrap_err();
        assert!(e.message().contains("query.pagination"));
    }
}

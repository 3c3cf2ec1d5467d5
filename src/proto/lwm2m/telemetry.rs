//! Payload + profile → TelemetryPoints (the product brief: "observe
//! notifications on those paths become numeric_values (or string_values) on
//! the telemetry point").
//!
//! Decoded values are mapped through the device profile to metric names and
//! kinds and grouped by timestamp (a SenML pack may carry several times): one
//! point per distinct timestamp. Values of a point are sorted by metric name,
//! each metric once (the last value for it wins). Integers stay integers
//! ([`Num`]). The common case, one value, allocates nothing but the point's
//! own small vectors inline.

use super::content::{Num, ResourceValue};
use super::profile::{MetricKind, Profile};
use smallvec::SmallVec;

/// The values of one point, by kind.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PointValues<'p> {
    pub numeric: SmallVec<[(&'p str, Num); 4]>,
    pub string: SmallVec<[(&'p str, String); 1]>,
    pub boolean: SmallVec<[(&'p str, bool); 1]>,
}

impl PointValues<'_> {
    pub fn is_empty(&self) -> bool {
        self.numeric.is_empty() && self.string.is_empty() && self.boolean.is_empty()
    }
}

fn put<'p, T, A: smallvec::Array<Item = (&'p str, T)>>(
    v: &mut SmallVec<A>,
    metric: &'p str,
    value: T,
) {
    match v.binary_search_by(|(m, _)| m.cmp(&metric)) {
        Ok(i) => v[i].1 = value,
        Err(i) => v.insert(i, (metric, value)),
    }
}

/// Points built from one payload, with what was left out.
#[derive(Debug, Default)]
pub struct Points<'p> {
    /// (timestamp, values), in the order the timestamps first appeared.
    pub points: SmallVec<[(i64, PointValues<'p>); 1]>,
    /// Values no profile mapping covers (not published).
    pub unmapped: usize,
    /// Values that did not convert to their metric's kind.
    pub bad: usize,
}

/// Maps `values` through `profile`; `now_ms` is the timestamp of values
/// without their own time.
pub fn build_points<'p>(
    profile: &'p Profile,
    values: &[ResourceValue<'_>],
    now_ms: i64,
) -> Points<'p> {
    let mut out = Points::default();
    for v in values {
        let Some(m) = profile.mapping(&v.path) else {
            out.unmapped += 1;
            continue;
        };
        let ts = v.time_ms.unwrap_or(now_ms);
        let idx = match out.points.iter().position(|(t, _)| *t == ts) {
            Some(i) => i,
            None => {
                out.points.push((ts, PointValues::default()));
                out.points.len() - 1
            }
        };
        let pv = &mut out.points[idx].1;
        let metric: &'p str = &m.metric;
        match m.kind {
            MetricKind::Numeric => match v.value.to_number(m.data_type) {
                Some(n) if n.is_finite() => put(&mut pv.numeric, metric, n),
                _ => out.bad += 1,
            },
            MetricKind::String => put(&mut pv.string, metric, v.value.to_string_value()),
            MetricKind::Bool => match v.value.to_bool() {
                Some(b) => put(&mut pv.boolean, metric, b),
                None => out.bad += 1,
            },
        }
    }
    out.points.retain(|(_, p)| !p.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::lwm2m::content::{self, ResourcePath};

    fn profile() -> Profile {
        Profile::builtin_default()
    }

    #[test]
    fn maps_groups_and_keeps_integers() {
        let p = profile();
        let senml = br#"[{"bn":"/3303/0/","bt":1700000000,"n":"5700","v":22.5},
                         {"bn":"/3/0/","n":"9","v":87},
                         {"bn":"/3303/0/","n":"5700","t":1700000060,"v":23},
                         {"bn":"","n":"/5/0/1","vs":"x"}]"#;
        let vals = content::decode(
            content::CF_SENML_JSON,
            ResourcePath::parse("/0").unwrap(),
            senml,
            0,
        )
        .unwrap();
        let pts = build_points(&p, &vals, 5);
        assert_eq!(pts.unmapped, 1);
        assert_eq!(pts.points.len(), 2);
        let (ts, v) = &pts.points[0];
        assert_eq!(*ts, 1_700_000_000_000);
        assert_eq!(
            v.numeric.as_slice(),
            &[
                ("battery_level", Num::Int(87)),
                ("temperature", Num::Float(22.5))
            ]
        );
        // A float resource sent as an integer literal stays a float metric.
        assert_eq!(
            pts.points[1].1.numeric.as_slice(),
            &[("temperature", Num::Float(23.0))]
        );
    }
}

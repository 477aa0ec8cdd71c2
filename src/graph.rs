//! The step graph: checked when it is built (unique IDs, known dependencies, no cycle).

use futures::future::LocalBoxFuture;

use crate::exec::{Recorder, Step, StepResult};

/// A step graph that was checked when it was built: IDs unique, every dependency a step of
/// the graph, no cycle. Steps keep their declaration order.
pub struct Graph<'s, C, I> {
    pub(crate) steps: Vec<Box<dyn Step<C, I> + 's>>,
    /// needs[i] = indexes of the steps step i depends on.
    pub(crate) needs: Vec<Vec<usize>>,
}

/// Why a graph is not a graph pgdr can run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("step {0} is declared twice")]
    Duplicate(String),
    #[error("step {step} depends on {dep}, which is not in the graph")]
    UnknownDependency { step: String, dep: String },
    #[error("steps depend on each other in a cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
}

impl<'s, C: 's, I: Copy + Eq + std::fmt::Display + 's> Graph<'s, C, I> {
    pub fn new(steps: Vec<Box<dyn Step<C, I> + 's>>) -> Result<Self, GraphError> {
        let ids: Vec<I> = steps.iter().map(|s| s.id()).collect();
        for (i, id) in ids.iter().enumerate() {
            if ids[..i].contains(id) {
                return Err(GraphError::Duplicate(id.to_string()));
            }
        }
        let mut needs = Vec::with_capacity(steps.len());
        for (i, s) in steps.iter().enumerate() {
            let mut n = Vec::new();
            for d in s.deps() {
                let j = ids
                    .iter()
                    .position(|x| *x == d)
                    .ok_or_else(|| GraphError::UnknownDependency { step: ids[i].to_string(), dep: d.to_string() })?;
                n.push(j);
            }
            needs.push(n);
        }
        if let Some(cycle) = find_cycle(&needs) {
            return Err(GraphError::Cycle(cycle.into_iter().map(|i| ids[i].to_string()).collect()));
        }
        Ok(Graph { steps, needs })
    }

    /// Part of a graph (`reprotect` takes down the detection machinery alone): dependencies on
    /// steps outside the part are dropped, the rest is checked as [`Graph::new`] checks.
    pub fn new_partial(steps: Vec<Box<dyn Step<C, I> + 's>>) -> Result<Self, GraphError> {
        let ids: Vec<I> = steps.iter().map(|s| s.id()).collect();
        let steps = steps.into_iter().map(|s| Box::new(Within { step: s, ids: ids.clone() }) as Box<dyn Step<C, I> + 's>).collect();
        Graph::new(steps)
    }

    pub fn steps(&self) -> impl Iterator<Item = &(dyn Step<C, I> + 's)> {
        self.steps.iter().map(|s| s.as_ref())
    }

    /// The read phase: every step's reads at once, across both regions.
    pub async fn read_ahead(&self, cx: &C) {
        futures::future::join_all(self.steps.iter().map(|s| s.reads(cx))).await;
    }
}

/// A step of a partial graph: its dependencies limited to the part.
struct Within<'s, C, I> {
    step: Box<dyn Step<C, I> + 's>,
    ids: Vec<I>,
}

impl<C, I: Copy + Eq> Step<C, I> for Within<'_, C, I> {
    fn id(&self) -> I {
        self.step.id()
    }
    fn deps(&self) -> Vec<I> {
        self.step.deps().into_iter().filter(|d| self.ids.contains(d)).collect()
    }
    fn up<'a>(&'a self, cx: &'a C, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        self.step.up(cx, rec)
    }
    fn down<'a>(&'a self, cx: &'a C, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        self.step.down(cx, rec)
    }
    fn reads<'a>(&'a self, cx: &'a C) -> LocalBoxFuture<'a, ()> {
        self.step.reads(cx)
    }
}

/// A cycle in `needs` (as the indexes along it, first repeated at the end), if there is one.
fn find_cycle(needs: &[Vec<usize>]) -> Option<Vec<usize>> {
    // 0 = unseen, 1 = on the current path, 2 = done.
    fn visit(i: usize, needs: &[Vec<usize>], mark: &mut [u8], path: &mut Vec<usize>) -> Option<Vec<usize>> {
        mark[i] = 1;
        path.push(i);
        for &j in &needs[i] {
            if mark[j] == 1 {
                let from = path.iter().position(|&p| p == j).unwrap_or(0);
                let mut c = path[from..].to_vec();
                c.push(j);
                return Some(c);
            }
            if mark[j] == 0 {
                if let Some(c) = visit(j, needs, mark, path) {
                    return Some(c);
                }
            }
        }
        path.pop();
        mark[i] = 2;
        None
    }
    let mut mark = vec![0u8; needs.len()];
    (0..needs.len()).find_map(|i| if mark[i] == 0 { visit(i, needs, &mut mark, &mut Vec::new()) } else { None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::Recorder;

    struct Fake(&'static str, Vec<&'static str>);

    impl Step<(), &'static str> for Fake {
        fn id(&self) -> &'static str {
            self.0
        }
        fn deps(&self) -> Vec<&'static str> {
            self.1.clone()
        }
        fn up<'a>(&'a self, _cx: &'a (), _rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
            Box::pin(async { Ok(()) })
        }
        fn down<'a>(&'a self, _cx: &'a (), _rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
            Box::pin(async { Ok(()) })
        }
    }

    fn fake(id: &'static str, deps: &[&'static str], _ms: u64, _fail: bool) -> Box<dyn Step<(), &'static str>> {
        Box::new(Fake(id, deps.to_vec()))
    }

    #[test]
    fn unknown_dependencies_and_cycles_are_refused() {
        let e = Graph::new(vec![fake("a", &[], 0, false), fake("b", &["nope"], 0, false)]).err();
        assert_eq!(e, Some(GraphError::UnknownDependency { step: "b".into(), dep: "nope".into() }));
        let e = Graph::new(vec![fake("a", &["c"], 0, false), fake("b", &["a"], 0, false), fake("c", &["b"], 0, false)]).err();
        assert_eq!(e, Some(GraphError::Cycle(vec!["a".into(), "c".into(), "b".into(), "a".into()])));
        let e = Graph::new(vec![fake("a", &[], 0, false), fake("a", &[], 0, false)]).err();
        assert_eq!(e, Some(GraphError::Duplicate("a".into())));
        let e = Graph::new(vec![fake("a", &["a"], 0, false)]).err();
        assert_eq!(e, Some(GraphError::Cycle(vec!["a".into(), "a".into()])));
    }

    #[test]
    fn a_partial_graph_drops_dependencies_outside_it() {
        let g = Graph::new_partial(vec![fake("b", &["a", "outside"], 0, false), fake("a", &[], 0, false)]).unwrap();
        let deps: Vec<Vec<&str>> = g.steps().map(|s| s.deps()).collect();
        assert_eq!(deps, vec![vec!["a"], vec![]]);
        assert!(Graph::new_partial(vec![fake("a", &["b"], 0, false), fake("b", &["a"], 0, false)]).is_err());
    }
}

//! Graph algorithms over `depends_on`: cycles (each named in full) and upstream sets.
//! Pure functions over adjacency lists; no knowledge of stages or components.

/// Every cycle in the graph, one per strongly connected component, as a path of
/// node indices that starts and ends at the same node (`a -> b -> a`).
pub fn cycles(deps: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let sccs = tarjan(deps);
    let mut out = Vec::new();
    for scc in sccs {
        let in_scc = |n: usize| scc.contains(&n);
        let start = *scc.iter().min().expect("an scc is never empty");
        if scc.len() == 1 && !deps[start].contains(&start) {
            continue;
        }
        // Walk inside the component from `start` until we come back to it.
        let mut path = vec![start];
        let mut seen = vec![false; deps.len()];
        if walk_back(deps, start, start, &in_scc, &mut path, &mut seen) {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn walk_back(
    deps: &[Vec<usize>],
    node: usize,
    target: usize,
    in_scc: &dyn Fn(usize) -> bool,
    path: &mut Vec<usize>,
    seen: &mut [bool],
) -> bool {
    seen[node] = true;
    let mut next: Vec<usize> = deps[node].iter().copied().filter(|&n| in_scc(n)).collect();
    next.sort_unstable();
    for n in next {
        if n == target {
            path.push(n);
            return true;
        }
        if !seen[n] {
            path.push(n);
            if walk_back(deps, n, target, in_scc, path, seen) {
                return true;
            }
            path.pop();
        }
    }
    false
}

fn tarjan(deps: &[Vec<usize>]) -> Vec<Vec<usize>> {
    struct State {
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn strong(v: usize, deps: &[Vec<usize>], s: &mut State) {
        s.index[v] = Some(s.next);
        s.low[v] = s.next;
        s.next += 1;
        s.stack.push(v);
        s.on_stack[v] = true;
        for &w in &deps[v] {
            match s.index[w] {
                None => {
                    strong(w, deps, s);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(iw) if s.on_stack[w] => s.low[v] = s.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack[w] = false;
                scc.push(w);
                if w == v {
                    break;
                }
            }
            s.out.push(scc);
        }
    }
    let n = deps.len();
    let mut s = State {
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if s.index[v].is_none() {
            strong(v, deps, &mut s);
        }
    }
    s.out
}

/// For each node, whether every other node is (transitively) one of its dependencies.
pub fn upstream_sets(deps: &[Vec<usize>]) -> Vec<Vec<bool>> {
    let n = deps.len();
    (0..n)
        .map(|start| {
            let mut seen = vec![false; n];
            let mut stack: Vec<usize> = deps[start].clone();
            while let Some(v) = stack.pop() {
                if !seen[v] {
                    seen[v] = true;
                    stack.extend(deps[v].iter().copied());
                }
            }
            seen
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_whole_cycles() {
        // 0 -> 1 -> 2 -> 0, 3 -> 3, 4 -> 0 (not in a cycle)
        let deps = vec![vec![1], vec![2], vec![0], vec![3], vec![0]];
        assert_eq!(cycles(&deps), vec![vec![0, 1, 2, 0], vec![3, 3]]);
        assert!(cycles(&[vec![], vec![0], vec![0, 1]]).is_empty());
    }

    #[test]
    fn upstream_is_transitive() {
        let up = upstream_sets(&[vec![], vec![0], vec![1]]);
        assert!(up[2][0] && up[2][1] && !up[0][2]);
    }
}

"""NetworkPolicy enforcement with nftables: a pure core and a thin I/O shell.

What each module owns (docs/policy.md has the semantics and the ruleset's layout):

* `model`: NetworkPolicy, Pod and Namespace as frozen values, parsed from Kubernetes dicts;
* `evaluator`: the reference answer to "is this connection allowed?", straight from the spec;
* `compiler`: (state, node, options) -> the node's nftables table (`Ruleset`), pure;
* `ruleset`: the table as a value and the transactions that install or change it, pure;
* `nftsim`: an interpreter of that nftables JSON, to check a table without a kernel;
* `applier`: one atomic nftables transaction per change, repairs when someone else changed
  the table;
* `sources`: a directory of Kubernetes YAML, and the store the Kubernetes source feeds;
* `kubesource`: NetworkPolicy, Pod and Namespace watched through the Kubernetes API.

The rule the package keeps: only `applier`, `sources` and `kubesource` do I/O; everything they
act on is computed by pure functions that tests can run without a kernel.
"""

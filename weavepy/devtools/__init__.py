"""Development tooling: the sandbox of namespaced nodes, its delayer, agentbox, podnet, demo, chaos.

Rule: nothing here runs in production. The agent (`weavepy launch`) and the CNI plugin never
import this package; the CLI loads it only for `weavepy sandbox|demo|chaos`, and an import
contract in lint holds that.
"""

"""Pod networking through CNI: the `weavepy-cni` client and the agent side that does the work.

`plugin` is the stdlib-only binary a container runtime executes; `protocol` and `result` turn
requests and results into and from the spec's formats; `server` is the agent's unix-socket
endpoint; `backend` and `podnet` do the pod IP and kernel work; `install` puts the plugin and
its network configuration on a node. This package file imports nothing, so the plugin starts
fast.
"""

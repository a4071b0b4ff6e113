"""The ray-worker's healthcheck: exits 0 when a raylet runs in this container and the
cluster's GCS (the head, ``sys.argv[1]``, host:port) lists that node as alive; so
`docker compose up --wait` returns once the worker has joined the head, not merely started.
The token comes as for every Ray call here: RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH."""

from __future__ import annotations

import sys


def main(address: str) -> None:
    from ray._private.services import find_node_ids
    from ray._raylet import GcsClient, NodeID
    from ray.core.generated.gcs_pb2 import GcsNodeInfo
    from ray.core.generated.gcs_service_pb2 import GetAllNodeInfoRequest

    local = find_node_ids()  # the --node_id of each raylet running here
    if not local:
        sys.exit("no raylet runs in this container")
    alive = GcsClient(address=address).get_all_node_info(
        timeout=5,
        node_selectors=[
            GetAllNodeInfoRequest.NodeSelector(node_id=NodeID.from_hex(node).binary())
            for node in local
        ],
        state_filter=GcsNodeInfo.GcsNodeState.ALIVE,
    )
    if not alive:
        sys.exit(f"node {', '.join(local)} is not alive in the cluster at {address}")


if __name__ == "__main__":
    main(sys.argv[1])

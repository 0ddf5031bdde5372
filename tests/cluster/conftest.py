from tests.cluster.fixtures import cluster, node_agent  # noqa: F401
from tests.cluster.node_fixtures import busybox, real_node  # noqa: F401
from tests.cluster.pod_stack import pod_stack  # noqa: F401
from tests.cluster.stack_fixtures import *  # noqa: F403

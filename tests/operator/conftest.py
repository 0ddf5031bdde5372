from tests.kube_fixtures import kube, kube_plane, kubelet, operator, operator_env  # noqa: F401

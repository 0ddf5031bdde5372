from tests.kube_fixtures import kube, kubelet, operator, operator_env  # noqa: F401

"""The operator authenticated by an exec credential plugin (as on EKS and GKE): kopf's
watches and the operator's own calls all carry the plugin's token."""

from __future__ import annotations

from pathlib import Path

from tests.kube_auth import plugin_runs, write_exec_kubeconfig
from tests.kube_fixtures import (
    PREDICTIONS,
    Kubelet,
    emulator_url,
    operator_environment,
    prediction_body,
    running_emulator,
    running_operator,
    wait_for_phase,
)

NS = "default"


async def test_operator_logs_in_with_an_exec_plugin(redis_url: str, tmp_path: Path) -> None:
    # On the emulator whatever the suite's backend: it records each request's headers.
    # (Over plain http kubectl would send no credentials at all; the operator's client
    # does, so the emulator sees them; tests/kube_auth.py writes the same for https.)
    async with running_emulator() as kube, Kubelet(kube, tmp_path / "kubelet"):
        kubeconfig = write_exec_kubeconfig(tmp_path / "exec-config", emulator_url(kube), "t-1")
        env = operator_environment(kube, redis_url, tmp_path, KUBECONFIG=str(kubeconfig))
        kube.keep_requests = True
        async with running_operator(kube, env, tmp_path / "operator.log"):
            body = prediction_body("x1", "https://fake.test/succeed")
            await kube.create_object(PREDICTIONS, NS, body)
            assert (await wait_for_phase(kube, "x1"))["status"]["phase"] == "succeeded"
    operator_calls = list(kube)  # over HTTP: the operator's (the kubelet acts in process)
    assert {r.headers.get("Authorization") for r in operator_calls} == {"Bearer t-1"}
    kinds = {(str(r.method.value).upper(), r.params.get("watch")) for r in operator_calls}
    assert ("GET", "true") in kinds  # kopf's watches
    assert any(r.url.path.endswith("/status") for r in operator_calls)  # the status writer
    assert plugin_runs(kubeconfig) >= 2  # kopf's login and the operator's client

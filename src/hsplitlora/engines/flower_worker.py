"""A SuperNode's ClientApp in one long-lived process. Flower 1.42's SuperNode runs every Message in
a fresh `flwr-clientapp` process that answers it and exits, so a ClientApp there could keep no
host between messages. Started beside a SuperNode in `--isolation process` mode, this worker takes
each ClientApp task the SuperNode hands out on its Runtime API, runs it through the one ClientApp
of engines/flower_engine.py in this process (whose registry keeps the client's host for the run),
and returns the reply: Flower's `flwr-clientapp` steps, in a loop instead of a process per message.

    .venv/bin/python -m hsplitlora.engines.flower_worker --runtime-api-address 127.0.0.1:9094
"""

from __future__ import annotations

import argparse
import time

POLL_S, POLL_MAX_S = 0.002, 0.1  # an idle worker asks its SuperNode for a task again, backing off


def serve(runtime_api_address: str, poll_s: float = POLL_S) -> None:
    """Take, run and answer ClientApp tasks from the SuperNode at `runtime_api_address` (its
    Runtime API, plain HTTP on localhost) until the process is stopped."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from hsplitlora.engines.flower_engine import client_app

    def connect(*interceptors) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address, insecure=True, root_certificates=None,
            interceptors=list(interceptors), retry_invoker=make_simple_http_retry_invoker(),
        )  # fmt: skip

    app = client_app()
    tasks = connect(RuntimeVersionHttpInterceptor(component_name="SuperExec"))
    wait = poll_s
    while True:
        acquired = tasks.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if not (acquired.HasField("task") and acquired.token):
            time.sleep(wait)
            wait = min(2 * wait, POLL_MAX_S)
            continue
        wait = poll_s
        client = connect(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                         RuntimeTokenHttpInterceptor(acquired.token))  # fmt: skip
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = None
        try:
            message, context, _, _ = pull_task_input(client)
            reply, status, details = app(message=message, context=context), SubStatus.COMPLETED, ""
        except Exception as error:  # noqa: BLE001  (the driver gets it as the reply's error)
            reason = f"{type(error).__name__}: {error}"
            reply, status, details = None, SubStatus.FAILED, reason
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        finally:
            heartbeat.stop()
        if reply is not None and context is not None:
            push_message(client, reply, context)
        push_task_output(client=client, context=context, sub_status=status, details=details)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a SuperNode's hsplitlora ClientApp in one long-lived process.")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    from hsplitlora.engines.flower_local import quicker_object_pulls

    quicker_object_pulls()  # the instructions' arrays, pulled from its SuperNode as soon as they are there
    serve(parser.parse_args().runtime_api_address)


if __name__ == "__main__":
    main()

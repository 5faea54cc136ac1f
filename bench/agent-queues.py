#!/usr/bin/env python3
"""Broker cost of N agent command queues on the 3-node test cluster (scripts/cluster.sh).

One "agent" = one channel with one queue `<collective>.agent.nodeNNNNN.example.com`, declared
like Vogeler's agent queue (x-max-length 100, x-overflow reject-publish, x-message-ttl 1 h,
plus x-queue-type quorum for the quorum variant), bound to the topic exchange
`<collective>.commands` with `all` and `node.<name>`, consumed with prefetch 8, manual ack.
Connections go round-robin to the three nodes (127.0.0.1:5681-5683), heartbeat 10 s (the
Vogeler default). With --channels-per-conn 1 (default) every agent has its own connection.

Phases, with the three nodes' beam.smp CPU (utime+stime from /proc/PID/stat) and RSS
(VmRSS) sampled at every boundary; the pids come from the cluster's state directory
(~/.cache/vogeler-cluster/rabbitN/beam.pid), never from process names:
  baseline idle window  -> open all connections+channels -> connected idle window
  -> declare+bind+consume -> idle window -> [optional: kill rabbit2 / start rabbit2]
  -> close clients -> delete the queues and the exchange
The agents run in a child process (this script with --child) on pika's SelectConnection;
its own CPU is reported separately as client CPU.

  nice -n 10 /tmp/aq-venv/bin/python bench/agent-queues.py --variant quorum --n 5000
  variants: classic-durable | classic-transient | quorum
One table row goes to stdout, one JSON object is appended to --out
(default /tmp/agent-queues/results.jsonl).
"""

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import threading
import time

CLUSTER_DIR = os.environ.get("VOGELER_CLUSTER_DIR", os.path.expanduser("~/.cache/vogeler-cluster"))
HERE = os.path.dirname(os.path.abspath(__file__))
CLUSTER_SH = os.path.join(HERE, "..", "scripts", "cluster.sh")
PORTS = [5681, 5682, 5683]
NODES = ["rabbit1", "rabbit2", "rabbit3"]
CLK = os.sysconf("SC_CLK_TCK")
VARIANTS = ("classic-durable", "classic-transient", "quorum")


def queue_name(collective, i):
    return f"{collective}.agent.node{i:05d}.example.com"


def node_key(i):
    return f"node.node{i:05d}.example.com"


def queue_props(variant):
    args = {"x-max-length": 100, "x-overflow": "reject-publish", "x-message-ttl": 3600000}
    if variant == "quorum":
        args["x-queue-type"] = "quorum"
    durable = variant != "classic-transient"
    return durable, args


# --------------------------------------------------------------------------------------------
# child: the agents
# --------------------------------------------------------------------------------------------


def child_main(cfg):
    import pika
    from pika.adapters.select_connection import IOLoop

    ioloop = IOLoop()
    n = cfg["n"]
    per_conn = cfg["channels_per_conn"]
    collective = cfg["collective"]
    exchange = f"{collective}.commands"
    durable, qargs = queue_props(cfg["variant"])
    creds = pika.PlainCredentials("guest", "guest")
    reconnect = cfg["reconnect"]
    retry_delay = cfg["retry_delay"]

    def out(obj):
        obj["t"] = time.time()
        tm = os.times()
        obj["client_cpu"] = tm.user + tm.system
        obj["client_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    st = {
        "phase": "connect",
        "shutting_down": False,
        "conn_open_errors": 0,
        "conn_lost": 0,
        "conn_reopened": 0,
        "chan_closed": {},
        "cancels": 0,
        "declare_errors": {},
        "consume_ok": 0,
        "reconsume_ok": 0,
        "last_reconsume_t": None,
        "first_loss_t": None,
        "delivered": 0,
    }
    conns = []
    pending_decl = []  # channels waiting for their declare chain
    inflight = [0]
    opened_first = [0]
    consuming = [0]

    class Chan:
        def __init__(self, conn, idx):
            self.conn = conn
            self.idx = idx
            self.ch = None
            self.consuming = False
            self.ever_consumed = False
            self.in_chain = False

        def open(self):
            if self.conn.c is None or not self.conn.c.is_open:
                return
            self.conn.c.channel(on_open_callback=self.on_open)

        def on_open(self, ch):
            self.ch = ch
            ch.add_on_close_callback(self.on_closed)
            ch.add_on_cancel_callback(self.on_cancel)
            if st["phase"] == "connect" and not self.conn.counted_open.get(self.idx):
                self.conn.counted_open[self.idx] = True
                opened_first[0] += 1
                if opened_first[0] == n:
                    out({"event": "connected", "conn_open_errors": st["conn_open_errors"]})
            if st["phase"] != "connect":
                enqueue(self)

        def on_cancel(self, frame):
            st["cancels"] += 1
            if self.consuming:
                self.consuming = False
                consuming[0] -= 1
            # The broker cancelled the consumer (queue gone or unavailable): redeclare.
            if reconnect and not st["shutting_down"] and self.ch is not None and self.ch.is_open:
                ioloop.call_later(retry_delay, lambda: enqueue(self))

        def on_closed(self, ch, reason):
            code = getattr(reason, "reply_code", None)
            key = re.sub(r"queue '[^']*'", "queue <q>", f"{code} {getattr(reason, 'reply_text', reason)}")[:160]
            if st["shutting_down"]:
                return
            st["chan_closed"][key] = st["chan_closed"].get(key, 0) + 1
            if self.consuming:
                self.consuming = False
                consuming[0] -= 1
            if self.in_chain:
                self.in_chain = False
                inflight[0] -= 1
                st["declare_errors"][key] = st["declare_errors"].get(key, 0) + 1
                pump()
            self.ch = None
            # A channel the broker closed on a live connection: open another and retry.
            if reconnect and self.conn.c is not None and self.conn.c.is_open:
                ioloop.call_later(retry_delay + random.random(), self.open)

        def chain(self):
            self.in_chain = True
            ch = self.ch
            name = queue_name(collective, self.idx)

            def consume(_f):
                ch.basic_consume(name, self.on_message, auto_ack=False, callback=consumed)

            def consumed(_f):
                self.in_chain = False
                inflight[0] -= 1
                if not self.consuming:
                    self.consuming = True
                    consuming[0] += 1
                if self.ever_consumed:
                    st["reconsume_ok"] += 1
                    st["last_reconsume_t"] = time.time()
                self.ever_consumed = True
                st["consume_ok"] += 1
                if st["phase"] == "declare" and st["consume_ok"] == n:
                    st["phase"] = "idle"
                    out({"event": "declared", "declare_errors": st["declare_errors"]})
                pump()

            def bind2(_f):
                ch.queue_bind(name, exchange, routing_key=node_key(self.idx), callback=consume)

            def bind1(_f):
                ch.queue_bind(name, exchange, routing_key="all", callback=bind2)

            def declare(_f):
                ch.queue_declare(name, durable=durable, exclusive=False, auto_delete=False,
                                 arguments=qargs, callback=bind1)

            ch.basic_qos(prefetch_count=8, callback=declare)

        def on_message(self, ch, method, props, body):
            st["delivered"] += 1
            ch.basic_ack(method.delivery_tag)

    class Conn:
        def __init__(self, k):
            self.k = k
            self.port_i = k % 3
            self.c = None
            self.counted_open = {}
            self.chans = [Chan(self, k * per_conn + j) for j in range(per_conn) if k * per_conn + j < n]
            self.opened_once = False

        def connect(self):
            port = PORTS[self.port_i]
            params = pika.ConnectionParameters(
                host="127.0.0.1", port=port, credentials=creds, heartbeat=cfg["heartbeat"],
                connection_attempts=1, socket_timeout=60, stack_timeout=120,
                client_properties={"connection_name": f"aqbench-{self.k}"})
            self.c = pika.SelectConnection(params, on_open_callback=self.on_open,
                                           on_open_error_callback=self.on_open_error,
                                           on_close_callback=self.on_close, custom_ioloop=ioloop)

        def on_open(self, c):
            if self.opened_once:
                st["conn_reopened"] += 1
            self.opened_once = True
            if st["phase"] == "connect":
                conn_window_done()
            for ch in self.chans:
                ch.open()

        def on_open_error(self, c, err):
            st["conn_open_errors"] += 1
            if st["phase"] == "connect":
                conn_window_done()
            if not st["shutting_down"]:
                # next node in the list, as an agent with several amqp.url entries would
                self.port_i = (self.port_i + 1) % 3
                ioloop.call_later(retry_delay + random.random(), self.connect)

        def on_close(self, c, reason):
            if st["shutting_down"]:
                closed_done()
                return
            st["conn_lost"] += 1
            if st["first_loss_t"] is None:
                st["first_loss_t"] = time.time()
            for ch in self.chans:
                if ch.consuming:
                    ch.consuming = False
                    consuming[0] -= 1
                if ch.in_chain:
                    ch.in_chain = False
                    inflight[0] -= 1
                ch.ch = None
            if reconnect:
                self.port_i = (self.port_i + 1) % 3
                ioloop.call_later(0.5 + 1.5 * random.random(), self.connect)

    # connection window: at most cfg["conn_window"] handshakes at once
    next_conn = [0]
    conn_inflight = [0]
    nconn = (n + per_conn - 1) // per_conn

    def start_conns():
        while conn_inflight[0] < cfg["conn_window"] and next_conn[0] < nconn:
            c = Conn(next_conn[0])
            conns.append(c)
            next_conn[0] += 1
            conn_inflight[0] += 1
            c.connect()

    def conn_window_done():
        conn_inflight[0] -= 1
        start_conns()

    def enqueue(chan):
        if chan.in_chain or chan.ch is None or not chan.ch.is_open:
            return
        pending_decl.append(chan)
        pump()

    def pump():
        while inflight[0] < cfg["decl_window"] and pending_decl:
            chan = pending_decl.pop(0)
            if chan.in_chain or chan.ch is None or not chan.ch.is_open or chan.consuming:
                continue
            inflight[0] += 1
            chan.chain()

    closing = [0]

    def closed_done():
        closing[0] -= 1
        if closing[0] <= 0:
            finish()

    def finish():
        out({"event": "stopped", **report()})
        ioloop.stop()

    def report():
        return {
            "consuming": consuming[0],
            "open_conns": sum(1 for c in conns if c.c is not None and c.c.is_open),
            "conn_lost": st["conn_lost"], "conn_reopened": st["conn_reopened"],
            "conn_open_errors": st["conn_open_errors"], "chan_closed": st["chan_closed"],
            "cancels": st["cancels"], "declare_errors": st["declare_errors"],
            "consume_ok": st["consume_ok"], "reconsume_ok": st["reconsume_ok"],
            "last_reconsume_t": st["last_reconsume_t"], "first_loss_t": st["first_loss_t"],
            "delivered": st["delivered"], "inflight": inflight[0], "pending": len(pending_decl),
            "pika_asserts": st.get("pika_asserts", 0),
        }

    buf = [b""]

    def on_stdin(fd, events):
        data = os.read(fd, 4096)
        if not data:
            data = b"stop\n"
        buf[0] += data
        while b"\n" in buf[0]:
            line, buf[0] = buf[0].split(b"\n", 1)
            cmd = line.decode().strip()
            if cmd == "declare":
                st["phase"] = "declare"
                for c in conns:
                    for ch in c.chans:
                        enqueue(ch)
            elif cmd == "report":
                out({"event": "report", **report()})
            elif cmd == "stop":
                if st["shutting_down"]:
                    continue
                st["shutting_down"] = True
                live = [c for c in conns if c.c is not None and not c.c.is_closed]
                closing[0] = len(live)
                if not live:
                    finish()
                for c in live:
                    try:
                        c.c.close()
                    except Exception:
                        closed_done()
                ioloop.call_later(60, finish)

    ioloop.add_handler(sys.stdin.fileno(), on_stdin, IOLoop.READ)
    out({"event": "started"})
    ioloop.call_later(0, start_conns)
    while True:
        try:
            ioloop.start()
            break
        except AssertionError as e:
            # pika 1.x asserts in its connection workflow when a handshake is aborted (seen
            # while a node was overloaded after a kill): count it, keep the other agents running
            st["pika_asserts"] = st.get("pika_asserts", 0) + 1
            print(f"child: pika assertion, continuing: {str(e)[:200]}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# parent: sampling, orchestration
# --------------------------------------------------------------------------------------------


def beam_pid(node):
    with open(os.path.join(CLUSTER_DIR, node, "beam.pid")) as f:
        pid = int(f.read().strip())
    # make sure it is this node's VM, not the system broker: cluster.sh marks every process of
    # a node with VOGELER_CLUSTER_NODE=<its state dir> in the environment
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmd = f.read()
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = f.read().split(b"\0")
    marker = f"VOGELER_CLUSTER_NODE={os.path.join(CLUSTER_DIR, node)}".encode()
    if b"beam.smp" not in cmd or marker not in env or f"RABBITMQ_NODENAME={node}@localhost".encode() not in env:
        raise RuntimeError(f"pid {pid} from {node}/beam.pid is not {node}@localhost's beam.smp")
    return pid


def proc_sample(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK  # utime, stime (fields 14, 15)
        rss = None
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
        return {"cpu": cpu, "rss_mb": rss}
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


class Sampler:
    def __init__(self):
        self.pids = {n: beam_pid(n) for n in NODES}

    def refresh(self, node):
        self.pids[node] = beam_pid(node)

    def sample(self, label):
        s = {"label": label, "t": time.time(), "nodes": {}}
        for n, pid in self.pids.items():
            s["nodes"][n] = proc_sample(pid) if pid else None
        with open("/proc/loadavg") as f:
            s["loadavg"] = f.read().split()[0]
        return s


def cpu_delta(a, b, nodes=NODES):
    """broker CPU seconds between two samples, per node and total (nodes missing in either
    sample count as 0)."""
    per = {}
    for n in nodes:
        x, y = a["nodes"].get(n), b["nodes"].get(n)
        per[n] = round(y["cpu"] - x["cpu"], 2) if x and y else None
    total = round(sum(v for v in per.values() if v is not None), 2)
    return total, per


def rss(s):
    return {n: (round(v["rss_mb"], 1) if v else None) for n, v in s["nodes"].items()}


def rabbitmqctl(node, *args, timeout=120):
    d = os.path.join(CLUSTER_DIR, node)
    i = NODES.index(node) + 1
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "HOME": os.path.join(CLUSTER_DIR, "rabbit-home"),
        "RABBITMQ_CONF_ENV_FILE": os.path.join(CLUSTER_DIR, "rabbitmq-env.conf"),
        "RABBITMQ_NODENAME": f"{node}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(PORTS[i - 1]),
        "RABBITMQ_DIST_PORT": str(25680 + i),
        "RABBITMQ_MNESIA_BASE": f"{d}/mnesia", "RABBITMQ_LOG_BASE": f"{d}/log",
        "RABBITMQ_PID_FILE": f"{d}/beam.pid", "RABBITMQ_CONFIG_FILE": f"{d}/rabbitmq.conf",
        "RABBITMQ_ENABLED_PLUGINS_FILE": f"{d}/enabled_plugins",
        "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "RABBITMQ_CTL_DIST_PORT_MIN": "35690", "RABBITMQ_CTL_DIST_PORT_MAX": "35699",
        "ERL_EPMD_ADDRESS": "127.0.0.1",
    }
    r = subprocess.run(["timeout", str(timeout), "/usr/lib/rabbitmq/bin/rabbitmqctl", "-q", "-n",
                        f"{node}@localhost", *args], env=env, capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def broker_status(node):
    """memory breakdown (MB) and file descriptors from `rabbitmqctl status`"""
    t0 = time.time()
    rc, so, se = rabbitmqctl(node, "status", "--formatter", "json", timeout=60)
    if rc != 0:
        return {"error": (se or so)[-300:]}
    try:
        j = json.loads(so)
    except ValueError:
        return {"error": "unparsable status"}
    mem = j.get("memory", {})
    top = {}
    for k, v in mem.items():
        if isinstance(v, (int, float)) and k not in ("strategy",):
            top[k] = round(v / 1e6, 1)
    keep = ["total", "connection_readers", "connection_writers", "connection_channels",
            "connection_other", "queue_procs", "quorum_queue_procs", "quorum_ets", "mnesia",
            "msg_index", "other_ets", "binary", "code", "atom", "other_proc", "plugins", "mgmt_db",
            "metrics", "allocated_unused", "reserved_unallocated", "other_system"]
    tot = mem.get("total")
    if isinstance(tot, dict):
        top["total"] = {k: round(v / 1e6, 1) for k, v in tot.items() if isinstance(v, (int, float))}
    fd = j.get("file_descriptors", {})
    return {"memory_mb": {k: top[k] for k in keep if k in top},
            "file_descriptors": fd, "processes": j.get("processes"),
            "took_s": round(time.time() - t0, 1)}


def amqp_params(port):
    import pika
    return pika.ConnectionParameters(host="127.0.0.1", port=port,
                                     credentials=pika.PlainCredentials("guest", "guest"),
                                     heartbeat=30, blocked_connection_timeout=60)


def passive_check(collective, indices, port):
    """passive declare of each queue through one node: ok / error code"""
    import pika
    res = {"ok": 0, "errors": {}, "by_home": {}}
    conn = pika.BlockingConnection(amqp_params(port))
    ch = conn.channel()
    for i in indices:
        home = NODES[i % 3]
        try:
            ch.queue_declare(queue_name(collective, i), passive=True)
            res["ok"] += 1
            key = "ok"
        except pika.exceptions.ChannelClosedByBroker as e:
            key = re.sub(r"queue '[^']*'", "queue <q>", f"{e.reply_code} {e.reply_text}")[:140]
            res["errors"][key] = res["errors"].get(key, 0) + 1
            key = str(e.reply_code)
            ch = conn.channel()
        b = res["by_home"].setdefault(home, {})
        b[key] = b.get(key, 0) + 1
    conn.close()
    return res


def publish_probe(collective, indices, port, t_kill, deadline_s=120):
    """publish with confirms + mandatory through one node to each queue (default exchange);
    time from the kill until each is confirmed (a quorum queue confirms once it has a leader)"""
    import pika
    conn = pika.BlockingConnection(amqp_params(port))
    ch = conn.channel()
    ch.confirm_delivery()
    out = {"confirmed": 0, "unroutable": 0, "nacked": 0, "errors": 0, "max_s": None, "times_s": []}
    for i in indices:
        try:
            ch.basic_publish("", queue_name(collective, i), b"probe", mandatory=True,
                             properties=pika.BasicProperties(expiration="60000"))
            out["confirmed"] += 1
            out["times_s"].append(round(time.time() - t_kill, 3))
        except pika.exceptions.UnroutableError:
            out["unroutable"] += 1
        except pika.exceptions.NackError:
            out["nacked"] += 1
        except pika.exceptions.AMQPError as e:
            out["errors"] += 1
            out.setdefault("error_text", str(e)[:200])
            try:
                ch = conn.channel()
                ch.confirm_delivery()
            except Exception:
                break
        if time.time() - t_kill > deadline_s:
            break
    try:
        conn.close()
    except Exception:
        pass
    if out["times_s"]:
        out["max_s"] = max(out["times_s"])
        out["median_s"] = sorted(out["times_s"])[len(out["times_s"]) // 2]
    del out["times_s"]
    return out


def delete_all(collective, n, variant):
    """delete the queues (3 threads, each through the node the queue was declared on) and the
    exchange"""
    import pika
    t0 = time.time()
    errors = [0]

    def worker(k):
        conn = pika.BlockingConnection(amqp_params(PORTS[k]))
        ch = conn.channel()
        for i in range(k, n, 3):
            try:
                ch.queue_delete(queue_name(collective, i))
            except pika.exceptions.ChannelClosedByBroker:
                errors[0] += 1
                ch = conn.channel()
        conn.close()

    ths = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    conn = pika.BlockingConnection(amqp_params(PORTS[0]))
    conn.channel().exchange_delete(f"{collective}.commands")
    conn.close()
    return {"delete_s": round(time.time() - t0, 1), "delete_errors": errors[0]}


class Child:
    def __init__(self, cfg):
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lines = []
        self.cv = threading.Condition()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        for line in self.p.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                print("child:", line.rstrip(), file=sys.stderr)
                continue
            with self.cv:
                self.lines.append(obj)
                self.cv.notify_all()
        with self.cv:
            self.lines.append({"event": "eof", "t": time.time()})
            self.cv.notify_all()

    def send(self, cmd):
        try:
            self.p.stdin.write(cmd + "\n")
            self.p.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def wait(self, event, timeout, progress=None):
        end = time.time() + timeout
        with self.cv:
            while True:
                for i, o in enumerate(self.lines):
                    if o["event"] in (event, "eof"):
                        del self.lines[: i + 1]
                        return o
                left = end - time.time()
                if left <= 0:
                    return None
                self.cv.wait(min(left, 5))

    def report(self, timeout=10):
        self.send("report")
        r = self.wait("report", timeout)
        if not r or r.get("event") != "report":
            raise RuntimeError(f"agents process gave no report ({r})")
        return r


def cluster_sh(*args):
    t0 = time.time()
    r = subprocess.run([CLUSTER_SH, *args], capture_output=True, text=True)
    return r.returncode, round(time.time() - t0, 1), (r.stderr + r.stdout)[-600:]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child")
    ap.add_argument("--variant", choices=VARIANTS)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--channels-per-conn", type=int, default=1)
    ap.add_argument("--idle", type=float, default=60, help="idle window with all consumers, s")
    ap.add_argument("--baseline-idle", type=float, default=20, help="idle window before connecting, s")
    ap.add_argument("--connected-idle", type=float, default=30,
                    help="idle window with connections+channels open, before declaring, s")
    ap.add_argument("--heartbeat", type=int, default=10)
    ap.add_argument("--conn-window", type=int, default=40)
    ap.add_argument("--decl-window", type=int, default=64)
    ap.add_argument("--status", action="store_true", help="rabbitmqctl status memory breakdown (outside the CPU windows)")
    ap.add_argument("--kill-test", action="store_true", help="kill rabbit2 after the idle window, then start it")
    ap.add_argument("--no-reconnect", action="store_true", help="agents do not reconnect after a loss")
    ap.add_argument("--retry-delay", type=float, default=2.0)
    ap.add_argument("--keep", action="store_true", help="do not delete the queues")
    ap.add_argument("--collective")
    ap.add_argument("--out", default="/tmp/agent-queues/results.jsonl")
    a = ap.parse_args()
    if a.child:
        return child_main(json.loads(a.child))
    if not a.variant:
        ap.error("--variant is required")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, a.n // max(1, a.channels_per_conn) + 1000))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    import pika
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    collective = a.collective or f"aqb-{a.variant}-{a.n}-{a.channels_per_conn}-{stamp}".lower()
    result = {"variant": a.variant, "n": a.n, "channels_per_conn": a.channels_per_conn,
              "connections": (a.n + a.channels_per_conn - 1) // a.channels_per_conn,
              "collective": collective, "started": stamp, "heartbeat_s": a.heartbeat,
              "idle_window_s": a.idle, "host_cpus": os.cpu_count(), "pika": pika.__version__}
    log = lambda *m: print(time.strftime("%H:%M:%S"), *m, file=sys.stderr, flush=True)
    samples = []
    S = Sampler()
    result["beam_pids"] = dict(S.pids)

    # the exchange, once
    conn = pika.BlockingConnection(amqp_params(PORTS[0]))
    conn.channel().exchange_declare(f"{collective}.commands", exchange_type="topic", durable=True)
    conn.close()

    if a.status:
        result["status_before"] = {n: broker_status(n) for n in NODES}
    s0 = S.sample("baseline_start"); samples.append(s0)
    log(f"{a.variant} n={a.n} x{a.channels_per_conn}/conn: baseline idle {a.baseline_idle}s")
    time.sleep(a.baseline_idle)
    s1 = S.sample("baseline_end"); samples.append(s1)

    cfg = {"n": a.n, "channels_per_conn": a.channels_per_conn, "collective": collective,
           "variant": a.variant, "heartbeat": a.heartbeat, "conn_window": a.conn_window,
           "decl_window": a.decl_window, "reconnect": not a.no_reconnect, "retry_delay": a.retry_delay}
    child = Child(cfg)
    st = child.wait("started", 30)
    c0 = st["client_cpu"]
    t_conn0 = time.time()
    s_conn0 = S.sample("connect_start"); samples.append(s_conn0)
    log("connecting")
    ev = child.wait("connected", 1200)
    if not ev or ev["event"] != "connected":
        result["failed"] = f"connect phase did not finish: {child.report(10)}"
        log(result["failed"])
        child.send("stop")
        child.wait("stopped", 90)
        return finish(a, result, samples)
    s_conn1 = S.sample("connected"); samples.append(s_conn1)
    t_conn1 = ev["t"]
    result["connect_wall_s"] = round(t_conn1 - t_conn0, 1)
    result["connect_broker_cpu_s"], result["connect_broker_cpu_per_node"] = cpu_delta(s_conn0, s_conn1)
    result["connect_client_cpu_s"] = round(ev["client_cpu"] - c0, 1)
    result["conn_open_errors"] = ev["conn_open_errors"]
    result["rss_connected_mb"] = rss(s_conn1)
    log(f"connected in {result['connect_wall_s']}s; connected idle {a.connected_idle}s")
    time.sleep(a.connected_idle)
    s_ci = S.sample("connected_idle_end"); samples.append(s_ci)
    r = child.report()
    cc_idle0 = r["client_cpu"]
    result["connected_idle_broker_cpu_s"], _ = cpu_delta(s_conn1, s_ci)
    result["connected_idle_broker_cpu_per_60s"] = round(result["connected_idle_broker_cpu_s"] * 60 / max(a.connected_idle, 1e-9), 2) if a.connected_idle else None
    result["connected_idle_client_cpu_s"] = round(cc_idle0 - ev["client_cpu"], 2)
    result["rss_connected_idle_mb"] = rss(s_ci)

    log("declaring")
    s_d0 = S.sample("declare_start"); samples.append(s_d0)
    t_d0 = time.time()
    child.send("declare")
    ev = child.wait("declared", 3600)
    if not ev or ev["event"] != "declared":
        result["failed"] = f"declare phase did not finish: {child.report(10)}"
        log(result["failed"])
    else:
        s_d1 = S.sample("declared"); samples.append(s_d1)
        result["declare_wall_s"] = round(ev["t"] - t_d0, 1)
        result["declare_broker_cpu_s"], result["declare_broker_cpu_per_node"] = cpu_delta(s_d0, s_d1)
        result["declare_client_cpu_s"] = round(ev["client_cpu"] - cc_idle0, 1)
        result["declare_errors"] = ev["declare_errors"]
        result["rss_declared_mb"] = rss(s_d1)
        log(f"declared in {result['declare_wall_s']}s; idle {a.idle}s")
        time.sleep(a.idle)
        s_i = S.sample("idle_end"); samples.append(s_i)
        r = child.report()
        result["idle_broker_cpu_s"], result["idle_broker_cpu_per_node"] = cpu_delta(s_d1, s_i)
        result["idle_broker_cpu_per_60s"] = round(result["idle_broker_cpu_s"] * 60 / a.idle, 2)
        result["idle_client_cpu_s"] = round(r["client_cpu"] - ev["client_cpu"], 2)
        result["rss_idle_end_mb"] = rss(s_i)
        result["client_maxrss_mb"] = round(r["client_maxrss_mb"], 1)
        result["consuming_at_idle_end"] = r["consuming"]
        if a.status:
            result["status_idle"] = {n: broker_status(n) for n in NODES}
        if a.kill_test:
            try:
                result["kill_test"] = kill_test(a, collective, S, child, samples, log)
            except Exception as e:  # keep the rest of the run
                result["kill_test_failed"] = repr(e)[:500]
                log(result["kill_test_failed"])
                rc, took, txt = cluster_sh("start", "rabbit2")
                S.refresh("rabbit2")

    child.send("stop")
    ev = child.wait("stopped", 120)
    result["client_cpu_total_s"] = round(ev["client_cpu"] - c0, 1) if ev and "client_cpu" in ev else None
    if ev:
        result["client_final"] = {k: ev.get(k) for k in ("conn_lost", "conn_reopened", "chan_closed", "cancels", "delivered")}
    try:
        child.p.wait(30)
    except subprocess.TimeoutExpired:
        child.p.kill()
    result["client_close_wall_s"] = round(time.time() - (ev["t"] if ev else time.time()), 1)
    if not a.keep:
        log("deleting the queues")
        s_x0 = S.sample("delete_start"); samples.append(s_x0)
        result.update(delete_all(collective, a.n, a.variant))
        s_x1 = S.sample("deleted"); samples.append(s_x1)
        result["delete_broker_cpu_s"], _ = cpu_delta(s_x0, s_x1)
        time.sleep(10)
        s_x2 = S.sample("deleted_settled"); samples.append(s_x2)
        result["rss_after_delete_mb"] = rss(s_x2)
    return finish(a, result, samples)


def kill_test(a, collective, S, child, samples, log):
    kt = {}
    n = a.n
    sample_idx = list(range(0, n, max(1, n // 200)))[:200]
    pre = passive_check(collective, sample_idx, PORTS[0])
    kt["passive_before"] = pre
    # which queues rabbit2 leads / is home of, as the broker says
    t0 = time.time()
    items = ["name", "type", "leader", "pid"] if a.variant == "quorum" else ["name", "type", "pid"]
    rc, so, se = rabbitmqctl("rabbit1", "list_queues", *items, "--formatter", "json", timeout=180)
    homes = {}
    try:
        for q in json.loads(so):
            if not q["name"].startswith(collective + "."):
                continue
            who = q.get("leader") if a.variant == "quorum" else None
            if not who:
                who = str(q.get("pid", ""))  # <rabbitN@localhost.x.y.z>: the home node
            for nd in NODES:
                if nd in str(who):
                    homes[q["name"]] = nd
    except ValueError:
        kt["list_queues_error"] = (se or so)[-300:]
    kt["list_queues_s"] = round(time.time() - t0, 1)
    counts = {}
    for nd in homes.values():
        counts[nd] = counts.get(nd, 0) + 1
    kt["home_or_leader_counts"] = counts
    on2 = [i for i in range(n) if homes.get(queue_name(collective, i)) == "rabbit2"] if homes else \
        [i for i in range(n) if i % 3 == 1]
    probe_idx = on2[:: max(1, len(on2) // 100)][:100]

    s_k0 = S.sample("before_kill"); samples.append(s_k0)
    log("killing rabbit2")
    t_kill = time.time()
    rc, took, txt = cluster_sh("kill", "rabbit2")
    kt["kill_rc"], kt["kill_cmd_s"] = rc, took
    t_killed = time.time()  # the SIGKILL went out somewhere between t_kill and now
    S.pids["rabbit2"] = None
    # publish probes through node 1 to queues rabbit2 led (quorum: time to new leader)
    if a.variant == "quorum":
        kt["publish_probe_rabbit2_queues"] = publish_probe(collective, probe_idx, PORTS[0], t_kill)
        pp = kt["publish_probe_rabbit2_queues"]
        pp["kill_cmd_returned_after_s"] = round(t_killed - t_kill, 2)
        log(f"publish probe: {pp}")
    kt["passive_after_kill"] = passive_check(collective, sample_idx, PORTS[0])
    kt["passive_after_kill_s"] = round(time.time() - t_kill, 1)
    log(f"passive after kill: ok {kt['passive_after_kill']['ok']}/{len(sample_idx)}")
    # watch the survivors and the agents for 30 s
    timeline = []
    peak = {n_: 0 for n_ in NODES}
    prev = s_k0
    while time.time() - t_kill < 30:
        time.sleep(2)
        s = S.sample("after_kill"); r = child.report()
        for n_ in NODES:
            if s["nodes"].get(n_):
                peak[n_] = max(peak[n_], s["nodes"][n_]["rss_mb"])
        tot, _ = cpu_delta(prev, s, ["rabbit1", "rabbit3"])
        timeline.append({"t": round(s["t"] - t_kill, 1), "cpu_s_r1r3": tot, "consuming": r["consuming"],
                         "open_conns": r["open_conns"], "reconsume_ok": r["reconsume_ok"]})
        prev = s
    s_k1 = S.sample("kill_plus_30s"); samples.append(s_k1)
    kt["after_kill_30s_cpu_s_rabbit1_rabbit3"], kt["after_kill_cpu_per_node"] = cpu_delta(s_k0, s_k1, ["rabbit1", "rabbit3"])
    kt["after_kill_peak_rss_mb"] = peak
    kt["after_kill_timeline"] = timeline
    r = child.report()
    kt["agents_after_kill_30s"] = {k: r[k] for k in ("consuming", "open_conns", "conn_lost", "conn_reopened",
                                                     "reconsume_ok", "cancels", "chan_closed", "declare_errors")}
    if r["last_reconsume_t"]:
        kt["last_reconsume_after_kill_s"] = round(r["last_reconsume_t"] - t_kill, 1)
    if a.variant == "quorum":
        t0 = time.time()
        rc, so, se = rabbitmqctl("rabbit1", "list_queues", "name", "leader", "--formatter", "json", timeout=180)
        try:
            leaders = {}
            for q in json.loads(so):
                if q["name"].startswith(collective + "."):
                    leaders[str(q.get("leader"))] = leaders.get(str(q.get("leader")), 0) + 1
            kt["leaders_after_kill"] = leaders
        except ValueError:
            kt["leaders_after_kill_error"] = (se or so)[-300:]
        kt["leaders_after_kill_list_s"] = round(time.time() - t0, 1)

    log("starting rabbit2")
    s_s0 = S.sample("before_start"); samples.append(s_s0)
    rc, took, txt = cluster_sh("start", "rabbit2")
    kt["start_rc"], kt["start_rejoin_s"] = rc, took
    if rc != 0:
        kt["start_output"] = txt
    S.refresh("rabbit2")
    s_s1 = S.sample("started"); samples.append(s_s1)
    kt["start_cpu_s_rabbit1_rabbit3"], _ = cpu_delta(s_s0, s_s1, ["rabbit1", "rabbit3"])
    kt["rabbit2_cpu_s_during_start"] = round(s_s1["nodes"]["rabbit2"]["cpu"], 1)
    # until every agent consumes again (classic durable: the agents of rabbit2 can only now)
    t_st = time.time()
    while time.time() - t_st < 60:
        r = child.report()
        if r["consuming"] >= n:
            break
        time.sleep(2)
    kt["all_consuming_after_start_s"] = round(time.time() - t_st, 1) if r["consuming"] >= n else None
    kt["consuming_after_start"] = r["consuming"]
    time.sleep(15)
    s_s2 = S.sample("started_plus"); samples.append(s_s2)
    kt["after_start_cpu_s"], kt["after_start_cpu_per_node"] = cpu_delta(s_s1, s_s2)
    kt["after_start_window_s"] = round(s_s2["t"] - s_s1["t"], 1)
    kt["rss_after_start_mb"] = rss(s_s2)
    kt["passive_after_start"] = passive_check(collective, sample_idx, PORTS[0])
    r = child.report()
    kt["agents_end"] = {k: r[k] for k in ("consuming", "open_conns", "conn_lost", "conn_reopened", "reconsume_ok",
                                          "cancels", "chan_closed", "declare_errors")}
    return kt


def finish(a, result, samples):
    result["samples"] = samples
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    g = result.get
    rs = g("rss_idle_end_mb") or g("rss_declared_mb") or {}
    row = [g("variant"), g("n"), f"{g('connections')}c", g("connect_wall_s"), g("connect_broker_cpu_s"),
           g("declare_wall_s"), g("declare_broker_cpu_s"),
           "/".join(str(int(v)) if v else "-" for v in rs.values()),
           g("connected_idle_broker_cpu_per_60s"), g("idle_broker_cpu_per_60s"),
           f"{g('connect_client_cpu_s')}+{g('declare_client_cpu_s')}+{g('idle_client_cpu_s')}",
           g("failed") or g("declare_errors") or ""]
    print("| variant | N | conns | connect s | connect brokerCPU s | declare s | declare brokerCPU s | RSS r1/r2/r3 MB | idle CPU/60s conns only | idle CPU/60s all | client CPU conn+decl+idle | errors |")
    print("| " + " | ".join(str(x) for x in row) + " |")
    print(f"(raw JSON appended to {a.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run a command and write its resource use: `python bench/rusage.py <out.json> -- cmd ...`.

A fresh process per measured run, so `getrusage(RUSAGE_CHILDREN)` covers exactly that command and the
descendants it waited for: peak RSS (ru_maxrss of the largest one) and user + system CPU seconds.
"""

import json
import resource
import subprocess
import sys
import time

out, command = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
started = time.time()
code = subprocess.call(command)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as handle:
    json.dump({"exit_code": code, "started_at": started, "wall_s": time.time() - started,
               "peak_rss_mib": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
               "cpu_user_s": usage.ru_utime, "cpu_sys_s": usage.ru_stime}, handle)
sys.exit(code)

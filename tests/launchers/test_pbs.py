"""PBS (PBS Pro and Torque): job ids, qsub, qdel, and qstat -f parsing.

Outputs marked "recorded" come from SLURM's Torque-compatible commands on the CI
machine; the others follow the documented ``qstat -f`` layout of Torque (4-space
indent, ``exit_status``) and PBS Pro (``Exit_status``, state ``F`` with ``-x``, long
values wrapped onto tab-indented lines).
"""

from __future__ import annotations

import pytest

from launchers import JobQueueError, JobSpec, JobState, PBSSystem, Retry, SubmissionError
from launchers._pbs import PBS_STATES, parse_qstat_full

# recorded: qstat -f 5 6 (5 was cancelled, 6 runs)
QSTAT_COMPAT = """Job Id:\t5
\tJob_Name = s.sh
\tJob_Owner = root@localhost
\tjob_state = C
\tqueue = debug
\texec_host = vm/1
\tResource_List.walltime = 71582788:15:00
\tResource_List.nodect = 1

Job Id:\t6
\tJob_Name = pbst
\tJob_Owner = root@localhost
\tjob_state = R
\tqueue = debug
\tResource_List.walltime = 00:05:00
\tResource_List.ncpus = 1

"""

QSTAT_TORQUE = """Job Id: 522083.barnacle.example.edu
    Job_Name = timeout.pbs
    resources_used.walltime = 00:00:14
    job_state = C
    queue = short
    exit_status = 271
    Output_Path = barnacle.example.edu:/home/u/timeout.pbs.o522083

Job Id: 522084.barnacle.example.edu
    Job_Name = ok.pbs
    job_state = C
    exit_status = 0

Job Id: 522085.barnacle.example.edu
    Job_Name = bad.pbs
    job_state = C
    exit_status = 2

Job Id: 522086.barnacle.example.edu
    Job_Name = waiting.pbs
    job_state = Q
"""

QSTAT_PBSPRO = """Job Id: 1001.pbs01
    Job_Name = analysis
    job_state = F
    Exit_status = 271
    comment = Job run at Mon Jan 01 at 10:00 on (node1:ncpus=4) and failed: walltime 3
\t610 exceeded limit 3600
    Resource_List.select = 1:ncpus=4

Job Id: 1002.pbs01
    Job_Name = queued
    job_state = Q
    comment = Not Running: Insufficient amount of resource: ncpus (R: 64 A: 8 T: 8
\t)

Job Id: 1003.pbs01
    job_state = F
    Exit_status = -3
"""

# recorded: the Torque-compatible qsub reports sbatch's failure on stdout
QSUB_COMPAT_ERROR = """There was an error running the Slurm sbatch command.
The command was:
'/usr/bin/sbatch -e p.sh.e%A -o p.sh.o%A -p nope p.sh 2>&1'
and the output was:
'sbatch: error: invalid partition specified: nope
 sbatch: error: Batch job submission failed: Invalid partition name specified
'
"""


def pbs(runner, dialect="torque", retries=2):
    sleeps: list[float] = []
    system = PBSSystem(
        dialect=dialect, runner=runner, retry=Retry(retries=retries, sleep=sleeps.append)
    )
    return system, sleeps


@pytest.mark.parametrize(
    ("stdout", "job_id"),
    [("4242.pbs01\n", "4242.pbs01"), ("17\n", "17"), ("9.srv.example.org", "9.srv.example.org")],
)
def test_job_id_is_what_qsub_prints(stdout, job_id):
    assert PBSSystem().parse_job_id(stdout) == job_id


def test_submit_runs_qsub_in_the_script_directory_with_output_on_the_command_line(runner, tmp_path):
    runner.reply("qsub", 0, "55.server\n")
    system, _ = pbs(runner)
    script = tmp_path / "dir with space" / "job-worker-x.sh"
    job_id = system.submit(str(script), output="/logs/job.log")
    assert job_id == "55.server"
    assert runner.calls == [
        (["qsub", "-o", "/logs/job.log", "-j", "oe", "job-worker-x.sh"], str(script.parent))
    ]


def test_qsub_failure_reported_on_stdout_is_a_permanent_submission_error(runner):
    runner.reply("qsub", 1, QSUB_COMPAT_ERROR, "")
    system, sleeps = pbs(runner)
    with pytest.raises(SubmissionError) as info:
        system.submit("/s/job.sh")
    assert not info.value.transient and sleeps == []
    assert "Invalid partition name specified" in info.value.stderr


def test_unreachable_pbs_server_is_transient_and_retried(runner):
    runner.reply("qsub", 15010, "", "qsub: cannot connect to server pbs01 (errno=111)\n")
    runner.reply("qsub", 0, "56.pbs01\n")
    system, sleeps = pbs(runner)
    assert system.submit("/s/job.sh") == "56.pbs01"
    assert sleeps == [1.0]


def test_qstat_full_output_is_parsed_including_wrapped_values():
    jobs = parse_qstat_full(QSTAT_PBSPRO)
    assert set(jobs) == {"1001.pbs01", "1002.pbs01", "1003.pbs01"}
    assert jobs["1001.pbs01"]["comment"].endswith("walltime 3610 exceeded limit 3600")
    assert jobs["1002.pbs01"]["comment"].endswith("(R: 64 A: 8 T: 8)")
    compat = parse_qstat_full(QSTAT_COMPAT)
    assert compat["6"]["job_state"] == "R" and compat["5"]["Job_Name"] == "s.sh"


def test_query_runs_one_qstat_and_translates_compat_states(runner):
    runner.reply("qstat", 0, QSTAT_COMPAT)
    system, _ = pbs(runner)
    statuses = system.query(["5", "6", "7"])
    assert runner.calls[0][0] == ["qstat", "-f", "5", "6", "7"]
    assert statuses["5"].state is JobState.COMPLETED
    assert statuses["6"].state is JobState.RUNNING and statuses["6"].source == "qstat"
    assert statuses["7"].state is JobState.UNKNOWN


def test_torque_exit_status_decides_between_completed_and_failed(runner):
    runner.reply("qstat", 0, QSTAT_TORQUE)
    system, _ = pbs(runner)
    ids = ["522083.barnacle", "522084.barnacle", "522085.barnacle", "522086.barnacle"]
    statuses = system.query(ids)
    killed = statuses["522083.barnacle"]
    assert (killed.state, killed.signal, killed.exit_code) == (JobState.FAILED, 15, None)
    assert statuses["522084.barnacle"].state is JobState.COMPLETED
    assert (statuses["522085.barnacle"].state, statuses["522085.barnacle"].exit_code) == (
        JobState.FAILED,
        2,
    )
    assert statuses["522086.barnacle"].state is JobState.PENDING


def test_pbspro_asks_for_finished_jobs_and_reads_walltime_kills_and_pending_reasons(runner):
    runner.reply("qstat", 0, QSTAT_PBSPRO)
    system, _ = pbs(runner, dialect="pbspro")
    statuses = system.query(["1001.pbs01", "1002.pbs01", "1003.pbs01"])
    assert runner.calls[0][0][:3] == ["qstat", "-f", "-x"]
    assert statuses["1001.pbs01"].state is JobState.TIMEOUT
    assert statuses["1001.pbs01"].signal == 15
    assert "Insufficient amount of resource" in statuses["1002.pbs01"].reason
    failed = statuses["1003.pbs01"]
    assert (failed.state, failed.exit_code, failed.reason) == (
        JobState.FAILED,
        -3,
        "PBS exit status -3",
    )


def test_jobs_qstat_no_longer_knows_are_unknown_not_an_error(runner):
    runner.reply("qstat", 153, "", "")  # recorded: the compat qstat for ended jobs
    system, _ = pbs(runner)
    assert system.query(["8"])["8"].state is JobState.UNKNOWN
    torque = type(runner)().reply("qstat", 153, "", "qstat: Unknown Job Id 8.srv\n")
    system, _ = pbs(torque)
    assert system.query(["8.srv"])["8.srv"].state is JobState.UNKNOWN


def test_other_qstat_failures_raise(runner):
    runner.reply("qstat", 2, "", "qstat: cannot connect to server pbs01 (errno=111)\n")
    system, sleeps = pbs(runner, retries=1)
    with pytest.raises(JobQueueError) as info:
        system.query(["1"])
    assert info.value.transient and sleeps == [1.0]


def test_cancel_tolerates_ended_jobs_but_not_other_failures(runner):
    system, _ = pbs(runner)
    runner.reply("qdel", 1, "", "")  # recorded: compat qdel on an ended job
    system.cancel(["1"])
    runner.reply("qdel", 153, "", "qdel: Unknown Job Id 2.srv\n")
    system.cancel(["2.srv"])
    runner.reply("qdel", 159, "", "qdel: Unauthorized Request  3.srv\n")
    with pytest.raises(JobQueueError, match="Unauthorized"):
        system.cancel(["3.srv"])


def test_every_native_state_letter_maps_to_a_job_state():
    assert set("QHWTSURBEXCFM") == set(PBS_STATES)


def test_output_file_is_unique_per_submission_since_pbs_has_no_job_id_pattern():
    system = PBSSystem()
    spec = JobSpec(name="w", log_directory="/logs")
    assert system.output_path(spec, "tok1") == "/logs/w-tok1.log"
    assert system.output_path(spec, "tok1") != system.output_path(spec, "tok2")
    assert system.log_path("/logs/w-tok1.log", "5") == "/logs/w-tok1.log"


def test_a_restart_passes_its_count_and_predecessor_to_qsub_keeping_the_environment(runner):
    runner.reply("qsub", 0, "57.server\n")
    system, _ = pbs(runner)
    variables = {"HPC_JOB_RESTARTS": "1", "HPC_JOB_RESTART_OF": "55.server"}
    assert system.submit("/s/job.sh", variables=variables) == "57.server"
    # -V as well: SLURM's qsub turns a lone -v into sbatch --export=NONE,...
    assert runner.calls == [
        (["qsub", "-V", "-v", "HPC_JOB_RESTARTS=1,HPC_JOB_RESTART_OF=55.server", "job.sh"], "/s")
    ]


QSTAT_PBSPRO_INTERRUPTED = """Job Id: 2001.pbs01
    job_state = F
    Exit_status = -20

Job Id: 2002.pbs01
    job_state = F
    Exit_status = -29

Job Id: 2003.pbs01
    job_state = F
    Exit_status = 271
    comment = Job preempted by delete
"""


def test_pbspro_node_failures_walltime_kills_and_preemptions_are_told_apart(runner):
    runner.reply("qstat", 0, QSTAT_PBSPRO_INTERRUPTED)
    system, _ = pbs(runner, dialect="pbspro")
    statuses = system.query(["2001.pbs01", "2002.pbs01", "2003.pbs01"])
    assert [s.state for s in statuses.values()] == [
        JobState.NODE_FAIL,
        JobState.TIMEOUT,
        JobState.PREEMPTED,
    ]
    assert all(s.state.is_interrupted for s in statuses.values())

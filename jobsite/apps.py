import sys

from django.apps import AppConfig


class JobsiteConfig(AppConfig):
    name = "jobsite"
    verbose_name = "Jobs"

    def ready(self):
        from django.db.models.signals import post_migrate
        from django_q.signals import post_spawn

        from jobsite import watchdog

        post_spawn.connect(watchdog.on_worker_start, dispatch_uid="jobsite-watchdog-start")
        post_migrate.connect(watchdog.ensure_schedule, sender=self, dispatch_uid="jobsite-watchdog-schedule")
        if sys.argv[1:2] == ["qcluster"]:
            from jobsite.worker import install_cluster_stop

            install_cluster_stop()

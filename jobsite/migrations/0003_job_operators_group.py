"""The "job operators" group: every permission that starts, stops or changes a job.

A staff user outside it (and not a superuser) sees every page, list and admin changelist
read-only; adding a person to this group is how an administrator lets them act.
"""

from django.contrib.auth.management import create_permissions
from django.db import migrations

GROUP = "job operators"
PERMISSIONS = {
    "extraction": [
        "add_extraction", "delete_extraction", "cancel_extraction", "retry_extraction", "resume_extraction",
        "dismiss_extraction", "add_modelrecord", "add_dataset",
    ],
    "training_runs": [
        "add_trainingrun", "train_trainingrun", "stop_trainingrun", "proceed_trainingrun", "resume_trainingrun",
        "remove_trainingrun", "adopt_trainingrun", "change_trainingpair", "add_corpus",
    ],
}


def create_group(apps, schema_editor):
    # Permissions are made after all migrations by default; the group needs them now.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group, _ = Group.objects.get_or_create(name=GROUP)
    for app_label, codenames in PERMISSIONS.items():
        found = Permission.objects.filter(content_type__app_label=app_label, codename__in=codenames)
        missing = set(codenames) - set(found.values_list("codename", flat=True))
        assert not missing, f"permissions not found: {sorted(missing)}"
        group.permissions.add(*found)


def remove_group(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name=GROUP).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("jobsite", "0002_api_token"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("extraction", "0008_lineage_dismiss_batch_changes_permissions"),
        ("training_runs", "0007_action_permissions"),
    ]

    operations = [migrations.RunPython(create_group, remove_group)]

"""The generated migration modules match proto/migration.proto."""

from __future__ import annotations

from pathlib import Path

from proto import migration_pb2, migration_pb2_grpc, regenerate


def test_generated_modules_are_current() -> None:
    assert regenerate.stale_files() == []


def test_a_stale_module_is_detected(tmp_path: Path) -> None:
    (tmp_path / "proto").mkdir()
    for name in ["migration.proto", *regenerate.generated_names(Path("migration.proto"))]:
        text = (regenerate.PROTO_DIR / name).read_text()
        (tmp_path / "proto" / name).write_text(text)
    assert regenerate.stale_files(tmp_path) == []
    source = tmp_path / "proto" / "migration.proto"
    source.write_text(source.read_text().replace(
        "uint32 num_blocks = 3;", "uint32 num_blocks = 3;\n  uint32 extra = 9;"))
    assert set(regenerate.stale_files(tmp_path)) == {"migration_pb2.py", "migration_pb2.pyi"}


def test_service_has_the_protocol_methods() -> None:
    service = migration_pb2.DESCRIPTOR.services_by_name["MigrationAgent"]
    assert [m.name for m in service.methods] == [
        "Reserve", "PushBlocks", "Commit", "Abort", "GetRequestState", "SendBlocks", "Handoff"]
    assert service.methods_by_name["PushBlocks"].client_streaming
    assert hasattr(migration_pb2_grpc, "MigrationAgentStub")

"""Namespaces and node pools over HTTP: an admin assigns a pool, its sandboxes go there."""

from __future__ import annotations

from collections.abc import Callable

from tests.api.conftest import ApiServer

KeyMaker = Callable[[str, list[str]], str]


def test_an_admin_assigns_a_namespace_to_a_pool_and_back(api_server: ApiServer) -> None:
    with api_server.client() as admin:
        set_ = admin.put("/api/v1/admin/namespaces/pool-team", json={"pool": "trusted"})
        assert set_.status_code == 200, set_.text
        assert set_.json()["pool"] == "trusted"
        listed = {
            n["name"]: n["pool"] for n in admin.get("/api/v1/admin/namespaces").json()["items"]
        }
        assert listed["pool-team"] == "trusted"

        reset = admin.put("/api/v1/admin/namespaces/pool-team", json={"pool": None})
        assert reset.json()["pool"] is None


def test_a_namespace_key_may_not_assign_pools_or_list_namespaces(
    api_server: ApiServer, namespace_key: KeyMaker
) -> None:
    key = namespace_key("pool-other", ["sandboxes:write", "sandboxes:read"])
    with api_server.client(key) as team:
        refused = team.put("/api/v1/admin/namespaces/pool-other", json={"pool": "trusted"})
        assert refused.status_code == 403
        assert team.get("/api/v1/admin/namespaces").status_code == 403


def test_bad_namespace_settings_are_422_naming_the_field(api_server: ApiServer) -> None:
    with api_server.client() as admin:
        bad_pool = admin.put("/api/v1/admin/namespaces/pool-team", json={"pool": "no spaces"})
        assert bad_pool.status_code == 422
        assert bad_pool.json()["error"]["details"][0]["loc"] == "body.pool"
        unknown = admin.put("/api/v1/admin/namespaces/pool-team", json={"pools": "x"})
        assert unknown.status_code == 422
        bad_name = admin.put("/api/v1/admin/namespaces/Not_A_Namespace", json={"pool": None})
        assert bad_name.status_code == 422


def test_a_namespace_in_a_restricted_pool_places_its_sandboxes_there(
    api_server: ApiServer, namespace_key: KeyMaker
) -> None:
    key = namespace_key("pool-trusted", ["sandboxes:write", "sandboxes:read"])
    with api_server.client(key) as team:
        asked = team.post("/api/v1/sandboxes", json={"labels": {"cave.pool": "trusted"}})
        assert asked.status_code == 403  # not assigned to it (yet)
        assert "pool-trusted" in asked.json()["error"]["message"]

        with api_server.client() as admin:
            admin.put("/api/v1/admin/namespaces/pool-trusted", json={"pool": "trusted"})
        # This session's single node is in no pool, so the trusted pool has no room at all:
        # the create is refused for capacity, naming the pool it was placed in.
        placed = team.post("/api/v1/sandboxes", json={})
        assert placed.status_code == 429, placed.text
        assert "'trusted'" in placed.json()["error"]["message"]
        listed = team.get("/api/v1/sandboxes").json()["items"]
        assert listed == []  # nothing written

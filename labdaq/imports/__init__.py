"""Other labs' cycler files brought in as read-only runs: :mod:`.readers` reads each
format into :class:`~.data.ImportedData` (labdaq's units, charge positive), :mod:`.store`
stores it as samples, steps and cycles beside the cycler's own per-cycle summary."""

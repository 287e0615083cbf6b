"""One recipe per workflow stage: `vlaforget <stage>` runs `vlaforget.stages.<stage>.main`
(docs/DEVELOPMENT.md, "The map of the packages"). Each recipe reads its stage config, builds
its pieces from the library, runs them and writes its outputs atomically, completion file last."""

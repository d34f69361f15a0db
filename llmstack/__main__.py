from llmstack.cli import main

if __name__ == "__main__":  # vLLM may spawn processes that import this module; they must not rerun the CLI
    main()
